"""Models whose own forward no front end captures are compiled piece by piece (``fxcompress/pieces.py``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from zoo import cbr, randomize_bn

import fxcompress as fxc
from fxcompress.errors import ExportError, TracingError


class Detector(nn.Module):
    """A list of images in, per image the boxes whose score passes a threshold out: the loop over the list and the
    boolean selection are what neither symbolic tracing nor torch.export captures."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(cbr(3, 16), cbr(16, 32, stride=2), cbr(32, 32))
        self.heads = nn.ModuleList([nn.Conv2d(32, 4, 1), nn.Conv2d(32, 1, 1)])

    def forward(self, images: list[torch.Tensor]):
        batch = torch.stack([nn.functional.interpolate(i[None], size=(16, 16))[0] for i in images])
        features = self.backbone(batch)
        boxes, scores = self.heads[0](features), self.heads[1](features).sigmoid()
        out = []
        for b, s in zip(boxes, scores):
            keep = s.flatten() > s.flatten().median()
            out.append({"boxes": b.flatten(1).t()[keep], "scores": s.flatten()[keep]})
        return out


def _detector():
    torch.manual_seed(0)
    model = randomize_bn(Detector().eval())
    g = torch.Generator().manual_seed(1)
    return model, ([torch.randn(3, 20, 24, generator=g), torch.randn(3, 16, 16, generator=g)],)


def _assert_same(got, want, atol):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=atol), k


def test_backbone_and_heads_compile_inside_the_python_forward():
    model, x = _detector()
    before = [p.clone() for p in model.parameters()]
    want = model(*x)
    result = fxc.compile(model, x, [{"pass": "fold_bn"}])
    assert result.trace.front_end == "pieces" and "list" in result.trace.fx_failure
    assert set(result.pieces) == {"backbone", "heads.0", "heads.1"}  # the ModuleList itself is never called
    assert {h.piece for h in result.history} == set(result.pieces)
    assert result.history[0].stats["bn_folded"] == 3
    assert result.before.macs == sum(r.before.macs for r in result.pieces.values()) > 0
    _assert_same(result.module(*x), want, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is untouched


def test_pieces_prune_exactly_keeping_their_outputs():
    model, x = _detector()
    mask = fxc.compile(model, x, [{"pass": "prune", "ratio": 0.5, "mode": "mask"}])
    removed = fxc.compile(model, x, [{"pass": "prune", "ratio": 0.5, "mode": "remove"}])
    backbone = removed.module.get_submodule("module.backbone")
    assert [m.out_channels for m in backbone.modules() if isinstance(m, nn.Conv2d)] == [8, 16, 32]  # output kept
    assert removed.after.macs < 0.6 * removed.before.macs
    _assert_same(removed.module(*x), mask.module(*x), 1e-4)


def test_pieces_quantize_on_what_they_receive_and_export_one_by_one(tmp_path):
    model, x = _detector()
    g = torch.Generator().manual_seed(2)
    calibration = [([torch.randn(3, 16, 16, generator=g)],) for _ in range(4)]
    result = fxc.compile(model, x, [{"pass": "quantize"}], calibration_data=calibration)
    assert result.pieces["backbone"].history[-1].stats["activations"] > 0
    with pytest.raises(ExportError, match="compiled piece by piece.*backbone"):
        result.export_onnx(tmp_path / "whole.onnx")
    from fxcompress.export import ort
    for name, piece in result.pieces.items():
        path = piece.export_onnx(tmp_path / f"{name}.onnx")
        got = ort.run(path, piece.example_inputs)[0]
        with torch.no_grad():
            want = piece.module(*piece.example_inputs)
        assert abs(got - want.numpy()).max() <= 0.05 * abs(want).max().item() + 1e-6


def test_what_pieces_cannot_take_is_an_error_that_says_why():
    model, x = _detector()
    with pytest.raises(TracingError, match="no train_data"):
        fxc.compile(model, x, [{"pass": "fold_bn"}], train_data=[x])
    with pytest.raises(TracingError, match="no leaf_modules"):
        fxc.compile(model, x, [{"pass": "fold_bn"}], leaf_modules=["heads"])

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, images):
            return [self.conv(i[None]) for i in images]  # the only layer is called once per image

    with pytest.raises(TracingError, match="no submodule of it compiles.*conv: called 2 times"):
        fxc.compile(Opaque().eval(), ([torch.randn(3, 4, 4), torch.randn(3, 4, 4)],), [{"pass": "fold_bn"}])


def test_a_piece_that_receives_an_empty_batch_calibrates_on_the_others():
    """A head called on the rows an image selects (Mask R-CNN's mask head on its RoIs) sees an empty batch when an
    image selects nothing: that calibration call is skipped, not an error."""

    class Selects(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, images: list[torch.Tensor]):
            x = torch.cat(images)
            return self.head(self.embed(x)[x[:, 0] > 0])

    torch.manual_seed(0)
    model = Selects().eval()
    g = torch.Generator().manual_seed(1)
    x = ([torch.randn(16, 4, generator=g).abs()],)
    never = torch.randn(16, 4, generator=g)
    never[:, 0] = -never[:, 0].abs()  # selects no row: the head's call is on an empty batch
    calibration = [([torch.randn(16, 4, generator=g).abs()],), ([never],)]
    result = fxc.compile(model, x, [{"pass": "quantize"}], calibration_data=calibration)
    assert set(result.pieces) == {"embed", "head"}
    assert result.pieces["head"].history[-1].stats["activations"] > 0
