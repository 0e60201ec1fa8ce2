"""The conformance suite's models: every torchvision classification, segmentation and detection model, the
smallest variant of every timm family and a list of Hugging Face architectures in small configurations, built
with random weights, randomised BatchNorm statistics and redrawn quiet parameters (no downloads)."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

SUITES = ("torchvision", "segmentation", "detection", "timm", "hf")
_TEXT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
_IMAGE = dict(image_size=64, num_channels=3)


def _hf_configs() -> dict[str, tuple[Callable[[], nn.Module], str]]:
    """name -> (factory of a small randomly initialised model, input kind)."""
    import transformers as t

    return {
        "bert": (lambda: t.BertModel(t.BertConfig(**_TEXT)), "text"),
        "distilbert": (lambda: t.DistilBertModel(t.DistilBertConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4,
                                                                    hidden_dim=128)), "text"),
        "roberta": (lambda: t.RobertaModel(t.RobertaConfig(**_TEXT, pad_token_id=1)), "text"),
        "albert": (lambda: t.AlbertModel(t.AlbertConfig(**_TEXT, embedding_size=32)), "text"),
        "gpt2": (lambda: t.GPT2Model(t.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, use_cache=False,
                                                  bos_token_id=0, eos_token_id=0)), "text"),
        "opt": (lambda: t.OPTModel(t.OPTConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                               num_attention_heads=4, word_embed_proj_dim=64, use_cache=False,
                                               pad_token_id=1)), "text"),
        "llama": (lambda: t.LlamaModel(t.LlamaConfig(**_TEXT, num_key_value_heads=2, use_cache=False)), "text"),
        "t5-encoder": (lambda: t.T5EncoderModel(t.T5Config(vocab_size=1000, d_model=64, d_kv=16, d_ff=128,
                                                           num_layers=2, num_heads=4, use_cache=False)), "text"),
        "vit": (lambda: t.ViTModel(t.ViTConfig(**_IMAGE, patch_size=16, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=128)), "image"),
        "swin": (lambda: t.SwinModel(t.SwinConfig(**_IMAGE, patch_size=4, embed_dim=32, depths=[1, 1],
                                                  num_heads=[2, 4], window_size=4)), "image"),
        "convnext": (lambda: t.ConvNextModel(t.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1],
                                                              num_stages=2)), "image"),
        "resnet": (lambda: t.ResNetModel(t.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                        layer_type="basic")), "image"),
        "wav2vec2": (lambda: t.Wav2Vec2Model(t.Wav2Vec2Config(hidden_size=64, num_hidden_layers=2,
                                                              num_attention_heads=4, intermediate_size=128,
                                                              conv_dim=(32, 32), conv_stride=(5, 4),
                                                              conv_kernel=(10, 8),
                                                              num_conv_pos_embeddings=16,
                                                              num_conv_pos_embedding_groups=4)), "audio"),
        "whisper-encoder": (lambda: t.WhisperModel(t.WhisperConfig(
            vocab_size=1000, d_model=64, encoder_layers=2, encoder_attention_heads=4, decoder_layers=1,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
            max_source_positions=32, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
            suppress_tokens=[], begin_suppress_tokens=[])).get_encoder(), "mel"),
    }


HF_MODELS = ("bert", "distilbert", "roberta", "albert", "gpt2", "opt", "llama", "t5-encoder", "vit", "swin",
             "convnext", "resnet", "wav2vec2", "whisper-encoder")


def randomize_bn(model: nn.Module, seed: int = 0, mean: float = 0.1, var: tuple[float, float] = (0.5, 1.5),
                 weight: tuple[float, float] = (0.8, 1.2), bias: float = 0.1) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, in place (folding the defaults, mean 0 and variance 1,
    proves little): means and biases normal with the given spreads, variances and weights uniform in the ranges."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g) * mean)
                    m.running_var.copy_(torch.rand(n, generator=g) * (var[1] - var[0]) + var[0])
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) * (weight[1] - weight[0]) + weight[0])
                    m.bias.copy_(torch.randn(n, generator=g) * bias)
    return model


def randomize_quiet_parameters(model: nn.Module, seed: int = 0) -> list[str]:
    """Redraw, in place, the parameters a fresh model initialises so that parts of it do not reach the output: an
    all-zero weight matrix or kernel (torchvision ViT's head: every output 0, so every comparison would hold) gets
    PyTorch's default uniform draw; a constant tiny non-bias tensor (layer scale at 1e-5, a zero gate) gets values
    uniform in [0.5, 1.5], so a branch a wrong rewrite breaks moves the output.  Returns the names redrawn."""
    g = torch.Generator().manual_seed(seed)
    redrawn = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0 or name.endswith("bias"):
                continue
            flat = p.detach().reshape(-1)
            if p.dim() >= 2 and not bool(flat.any()):
                bound = 1.0 / max(p[0].numel(), 1) ** 0.5
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            elif bool((flat == flat[0]).all()) and float(flat[0].abs()) < 1e-3:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                continue
            redrawn.append(name)
    return redrawn


_HF_SMALL = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, image_size=64, num_mel_bins=16, max_source_positions=32, head_dim=16)
_HF_KINDS = {"input_ids": "text", "pixel_values": "image", "input_values": "audio", "input_features": "mel"}


def _hf_auto(model_type: str) -> tuple[Callable[[], nn.Module], str]:
    """Any other Hugging Face architecture, as a new user would build it: ``AutoModel`` of the default config of
    ``model_type`` with the usual size fields made small where the config has them as one number (``_HF_SMALL``);
    the inputs follow the model's ``main_input_name``."""
    import transformers as t
    try:
        config = t.AutoConfig.for_model(model_type)
    except ValueError as exc:
        raise SystemExit(f"hf:{model_type}: not one of {', '.join(HF_MODELS)} nor a transformers model type "
                         f"({exc})") from None
    fields = config.to_dict()
    config.update({k: v for k, v in _HF_SMALL.items() if isinstance(fields.get(k), int)})  # not per-stage lists
    if hasattr(config, "use_cache"):
        config.use_cache = False
    kind = _HF_KINDS.get(t.AutoModel._model_mapping[type(config)].main_input_name)  # a class attribute
    if kind is None:
        raise SystemExit(f"hf:{model_type}: its main input is not one of {', '.join(_HF_KINDS)}")
    return (lambda: t.AutoModel.from_config(config)), kind


def _hf_inputs(kind: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "text":
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 8:] = 0
        return {"input_ids": torch.randint(2, 1000, (2, 12), generator=g), "attention_mask": mask}
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 64, 64, generator=g)}
    if kind == "audio":
        return {"input_values": torch.randn(2, 1600, generator=g)}
    return {"input_features": torch.randn(2, 16, 64, generator=g)}


MAX_SIDE = 512  # timm models made for larger inputs run at 224 px where they take any size (a 768 px ViT: 2304 tokens)


def build(spec: str, seed: int = 1) -> tuple[nn.Module, Any, Callable[[int], Any]]:
    """(model in eval mode, example inputs, sampler of further inputs by seed) of ``suite:name``.  A timm model runs
    at its pretrained input size, or at 224 px if that size is over ``MAX_SIDE`` and the model takes other sizes
    (timm's ``fixed_input_size`` False): one step of a 400 M-parameter ViT at 768 px takes minutes on 2 cores, and
    the steps check the graph, which does not depend on the size."""
    suite, _, name = spec.partition(":")
    torch.manual_seed(0)
    if suite == "hf":
        factory, kind = _hf_configs()[name] if name in HF_MODELS else _hf_auto(name)
        model = factory().eval()
        randomize_bn(model)  # Hugging Face draws BatchNorm weights ~ N(0, 0.02): MobileViT's outputs were 1e-40
        randomize_quiet_parameters(model)
        return model, _hf_inputs(kind, seed), lambda s: _hf_inputs(kind, s)
    if suite == "timm":
        import timm
        model = timm.create_model(name, pretrained=False)
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        if max(size[1:]) > MAX_SIDE and not model.pretrained_cfg.get("fixed_input_size", False):
            size = (size[0], 224, 224)  # a model made for 768 px runs at 224 px too: the graph is the same
    elif suite in ("torchvision", "segmentation", "detection"):
        import torchvision
        extra = {} if suite == "torchvision" else {"num_classes": 5, "weights_backbone": None}
        if suite == "detection" and not name.startswith("ssd"):  # SSD fixes its own input size
            extra.update(min_size=224, max_size=224)
        model = torchvision.models.get_model(name, weights=None, **extra)
        size = (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
    else:
        raise SystemExit(f"unknown suite {suite!r} in {spec!r}: one of {', '.join(SUITES)}")
    randomize_bn(model.eval())
    randomize_quiet_parameters(model)

    def sample(s: int) -> Any:
        x = torch.randn((1, *size), generator=torch.Generator().manual_seed(s))
        return ([x[0]],) if suite == "detection" else (x,)
    if suite == "detection":
        detect_something(model, sample(seed))
    return model, sample(seed), sample


def detect_something(model: nn.Module, inputs: tuple) -> None:
    """A random detector may score every box under its threshold (torchvision Mask R-CNN v2): then every output is
    empty and a comparison proves nothing.  Its score threshold is then lowered to 0, in place, so that the boxes
    it finds are kept."""
    with torch.no_grad():
        if any(len(d["boxes"]) for d in model(*inputs)):
            return
    holders = [m for m in (model, getattr(model, "roi_heads", None)) if hasattr(m, "score_thresh")]
    for m in holders:
        m.score_thresh = 0.0


def catalogue(suite: str) -> list[str]:
    """Model specs of a suite, in a fixed order."""
    if suite == "hf":
        return [f"hf:{n}" for n in HF_MODELS]
    if suite == "timm":
        return [f"timm:{n}" for n in smallest_timm_models()]
    import torchvision.models as tvm
    module = {"torchvision": tvm, "segmentation": tvm.segmentation, "detection": tvm.detection}[suite]
    return [f"{suite}:{n}" for n in tvm.list_models(module=module)]


def smallest_timm_models() -> list[str]:
    """The model with the fewest parameters of every timm module (built on the meta device: no memory, no data)."""
    import timm
    chosen = []
    for module in timm.list_modules():
        best: tuple[int, str] | None = None
        for name in timm.list_models(module=module):
            if name.startswith("test_"):
                continue
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False)
            except Exception:  # noqa: BLE001  (a variant that cannot be built is no family's smallest)
                continue
            n = sum(p.numel() for p in model.parameters())
            if best is None or n < best[0]:
                best = (n, name)
        if best is not None:
            chosen.append(best[1])
    return chosen
