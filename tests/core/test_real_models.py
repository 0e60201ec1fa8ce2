"""Third-party models as a new user brings them: torchvision's segmentation models (OrderedDict outputs) and Hugging
Face transformers (captured with torch.export, ModelOutput results), small configurations, random weights."""
from __future__ import annotations

import pytest
import torch

import fxcompress as fxc
from fxcompress.bench import zoo

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")


def _same_structure(a, b) -> None:
    from torch.utils import _pytree as pytree
    assert type(a) is type(b) and pytree.tree_structure(a) == pytree.tree_structure(b)


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_torchvision_segmentation_models_fold_and_prune_exactly(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    want = model(x)
    folded = fxc.compile(model, (x,), [{"pass": "fold_bn"}])
    _same_structure(folded.module(x), want)
    assert torch.allclose(folded.module(x)["out"], want["out"], atol=1e-5 * want["out"].abs().max().item() + 1e-5)
    mask = fxc.compile(model, (x,), [{"pass": "prune", "ratio": 0.3, "mode": "mask"}])
    removed = fxc.compile(model, (x,), [{"pass": "prune", "ratio": 0.3, "mode": "remove"}])
    assert removed.after.macs < 0.8 * removed.before.macs
    out = removed.module(x)["out"]
    assert torch.allclose(out, mask.module(x)["out"], atol=1e-4 * out.abs().max().item())


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "llama", "vit"])
def test_hugging_face_models_trace_prune_exactly_and_export(name, tmp_path):
    model, inputs, _ = zoo.build(f"hf:{name}")
    want = model(**inputs)
    traced = fxc.compile(model, inputs, [{"pass": "fold_bn"}]) if name == "vit" else None
    mask = fxc.compile(model, inputs, [{"pass": "prune", "ratio": 0.5, "mode": "mask"}])
    removed = fxc.compile(model, inputs, [{"pass": "prune", "ratio": 0.5, "mode": "remove"}])
    assert removed.trace.front_end == "export"
    out = removed.module(**inputs)
    _same_structure(out, want)
    # heads' dims and FFN widths (GPT-2's Conv1D layers as addmm), Llama's grouped KV heads: 0.50-0.62 measured
    assert removed.after.macs < 0.7 * removed.before.macs
    scale = out.last_hidden_state.abs().max().item()
    assert torch.allclose(out.last_hidden_state, mask.module(**inputs).last_hidden_state, atol=1e-4 * scale)
    if traced is not None:
        assert torch.allclose(traced.module(**inputs).last_hidden_state, want.last_hidden_state, atol=1e-5)
    import onnxruntime as ort
    session = ort.InferenceSession(str(removed.export_onnx(tmp_path / "m.onnx")))
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    assert abs(got[0] - out.last_hidden_state.detach().numpy()).max() < 1e-4 * scale
    if "input_ids" in inputs:  # batch and sequence length stay dynamic in ONNX
        other = {"input_ids": torch.randint(0, 100, (3, 5)), "attention_mask": torch.ones(3, 5, dtype=torch.long)}
        got = session.run(None, {k: v.numpy() for k, v in other.items()})
        want = removed.module(**other).last_hidden_state.detach().numpy()
        assert got[0].shape == want.shape and abs(got[0] - want).max() < 1e-4 * scale


def test_torchvision_detection_compiles_piece_by_piece_exactly():
    """Faster R-CNN: the image list, transform, anchors, RoI pooling and NMS stay Python; the backbone with its FPN
    and the box head and predictor compile, fold and prune exactly (each piece on what it receives)."""
    model, x, _ = zoo.build("detection:fasterrcnn_mobilenet_v3_large_320_fpn")
    folded = fxc.compile(model, x, [{"pass": "fold_bn"}])
    assert set(folded.pieces) == {"backbone", "roi_heads.box_head", "roi_heads.box_predictor"}
    assert {"transform", "rpn", "roi_heads.box_roi_pool"} <= set(folded.trace.auto_leaves)
    assert zoo.compare(folded, model, x) <= 1e-5
    _same_structure(folded.module(*x), model(*x))
    mask = fxc.compile(model, x, [{"pass": "prune", "ratio": 0.3, "mode": "mask"}])
    removed = fxc.compile(model, x, [{"pass": "prune", "ratio": 0.3, "mode": "remove"}])
    assert removed.after.macs < 0.75 * removed.before.macs
    assert zoo.compare(removed, mask.module, x) <= 1e-4


def test_torchvision_swin_macs_count_the_window_attention():
    """torchvision's window attention is a function of the block's weights: its MACs count (Swin-T: 4.5 G, as
    published)."""
    model = torchvision.models.swin_t().eval()
    macs = fxc.compile(model, (torch.randn(1, 3, 224, 224),), [{"pass": "fold_bn"}]).before.macs
    assert 4.45e9 < macs < 4.55e9


@pytest.mark.parametrize("v2", [False, True])
def test_torchvision_swin_prunes_head_dims_and_streams(v2, tmp_path):
    """The window attention's head dims prune apart from the stream (remove mode calls an equivalent that reads the
    widths from the weights, with the original query scale): with the LayerNorm-coupled streams left out, removal
    equals masking; with them, the streams prune too (reported inexact), and relative position tables do not count
    as channels."""
    torch.manual_seed(0)
    swin = torchvision.models.swin_transformer
    block, merge = (swin.SwinTransformerBlockV2, swin.PatchMergingV2) if v2 else \
        (swin.SwinTransformerBlock, swin.PatchMerging)
    model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                               window_size=[4, 4], block=block, downsample_layer=merge,
                                               num_classes=10).eval()
    zoo.randomize_quiet_parameters(model)
    x = (torch.randn(2, 3, 40, 48),)  # 10 x 12 tokens: windows pad and shift
    full = fxc.compile(model, x, [{"pass": "prune", "ratio": 0.3, "mode": "remove"}])
    deps, chosen = full.history[0].stats, full.history[1]
    assert deps["barrier_ops"] == 0 and deps["prunable_channels"] >= 0.9 * deps["channels"]
    inexact = [n.split()[1].rstrip(":") for n in chosen.notes if "inexact removal" in n]
    assert inexact  # the streams, through their LayerNorms
    recipe = {"pass": "prune", "ratio": 0.5, "exclude": inexact}
    mask = fxc.compile(model, x, [{**recipe, "mode": "mask"}])
    removed = fxc.compile(model, x, [{**recipe, "mode": "remove"}])
    attn = removed.module.get_submodule("features.1.0.attn")
    assert attn.qkv.weight.shape == (3 * 16, 32) and attn.proj.weight.shape == (32, 16)  # head dims halved
    assert zoo.compare(removed, mask.module, x) <= 1e-5
    assert removed.after.macs < 0.8 * removed.before.macs
    path = removed.export_onnx(tmp_path / "swin.onnx")
    assert zoo._ort_error(path, x, removed.module(*x)) <= 1e-4
    removed.save(tmp_path / "swin.pt")
    assert torch.equal(fxc.load(tmp_path / "swin.pt")(*x), removed.module(*x))
