"""Layers whose weights are stored in few bits: rebuilt in the forward from codes, so a file can hold the codes.

``CodebookLayer`` (weight sharing, ``passes/quant/weight_share``): W = codebook[codes] (x a scale per output
channel once a BatchNorm is folded in).  ``LowBitLayer`` (``passes/quant/binarize``): W = alpha x sign(V) (binary),
alpha x {-1, 0, +1} (ternary) or s x round(V / s) (8 or 4 bits) from a latent float weight V trained through a
straight-through estimator; its input may be binarized too (XNOR-Net).  Both give their weights as
``parts()`` = (codebook, codes, per-channel scale or None, dense weight): what the ONNX export stores
(``export/codebook.py``).  Tracing keeps them whole (``LEAF_MODULES``).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def index_bits(k: int) -> int:
    """Bits of one stored code for a codebook of k entries (at least 1): what the export packs per code."""
    return max(1, math.ceil(math.log2(k)))


def _layer_options(layer: nn.Module) -> tuple[str, dict]:
    kind = "linear" if isinstance(layer, nn.Linear) else f"conv{len(layer.kernel_size)}d"
    return kind, {} if kind == "linear" else {
        "stride": tuple(layer.stride), "padding": layer.padding if isinstance(layer.padding, str)
        else tuple(layer.padding), "dilation": tuple(layer.dilation), "groups": layer.groups}


def _apply(kind: str, options: dict, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, bias) if kind == "linear" else CONVS[int(kind[4])](x, w, bias, **options)


def _plain(kind: str, options: dict, w: torch.Tensor, bias: torch.Tensor | None, grad: bool,
           training: bool) -> nn.Module:
    """The plain layer computing ``_apply(kind, options, ., w, bias)``."""
    if kind == "linear":
        layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    else:
        conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[kind]
        layer = conv(w.shape[1] * options["groups"], w.shape[0], tuple(w.shape[2:]), bias=bias is not None, **options)
    layer.weight = nn.Parameter(w.detach().clone(), requires_grad=grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return layer.to(w.device).train(training)


class CodebookLayer(nn.Module):
    """A Linear or Conv whose weight is ``codebook[codes]`` (weight sharing, ``passes/quant/weight_share``).

    ``codebook`` (K x d, a Parameter: training it sums the weight gradients of each codeword's blocks) and
    ``codes`` (a uint8 buffer of the weight's d-blocks in row-major order) replace the weight; the bias and the
    convolution's arguments are the layer's own.  A folded BatchNorm adds ``scale``, one factor per output channel
    (W = scale x codebook[codes]).
    """

    def __init__(self, layer: nn.Module, codebook: torch.Tensor, codes: torch.Tensor):
        super().__init__()
        w = layer.weight
        self.kind, self.conv = _layer_options(layer)
        self.weight_shape = tuple(w.shape)
        self.codebook = nn.Parameter(codebook.detach().to(w.dtype, copy=True), requires_grad=w.requires_grad)
        self.register_buffer("codes", codes.detach().reshape(-1).to(torch.uint8, copy=True))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(),
                                                                 requires_grad=layer.bias.requires_grad)
        self.scale = None  # per output channel, once a BatchNorm is folded in (``fold``)

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    def dense_weight(self) -> torch.Tensor:
        w = self.codebook[self.codes.long()].reshape(self.weight_shape)
        return w if self.scale is None else w * self.scale.reshape(-1, *([1] * (w.dim() - 1)))

    def fold(self, scale: torch.Tensor, bias: torch.Tensor) -> None:
        """Scale the output channels by ``scale`` and set the bias (a BatchNorm folded in, in float64 by the
        caller): the codebook stays shared, the scale is one value per output channel."""
        dtype, grad = self.codebook.dtype, self.codebook.requires_grad
        total = scale.double() if self.scale is None else self.scale.detach().double() * scale.double()
        self.scale = nn.Parameter(total.to(dtype), requires_grad=grad)
        self.bias = nn.Parameter(bias.to(dtype), requires_grad=grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(self.kind, self.conv, x, self.dense_weight(), self.bias)

    def to_dense(self) -> nn.Module:
        """The equivalent plain layer (its weight the rebuilt one)."""
        return _plain(self.kind, self.conv, self.dense_weight(), self.bias, self.codebook.requires_grad, self.training)

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        return self.codebook.detach(), self.codes, None if self.scale is None else self.scale.detach(), \
            self.dense_weight().detach()

    def extra_repr(self) -> str:
        k, d = self.codebook.shape
        return (f"{self.kind}, weight={self.weight_shape}, codebook={k}x{d}"
                + (", scaled per channel" if self.scale is not None else ""))


class _SignSTE(torch.autograd.Function):
    """sign with sign(0) = +1; gradient passed where |x| <= 1 (BinaryConnect's hardtanh estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


MODES = ("binary", "ternary", "int8", "int4")
_LIMITS = {"int8": 127, "int4": 7}  # symmetric per-channel grids: round(V / s) in [-limit, limit], s = max |V| / limit
_CODEBOOKS = {"binary": [-1.0, 1.0], "ternary": [-1.0, 0.0, 1.0],
              **{m: [float(v) for v in range(-q, q + 1)] for m, q in _LIMITS.items()}}


class LowBitLayer(nn.Module):
    """A Linear or Conv computing with its weight in 1, 1.6, 4 or 8 bits per weight from a latent float weight.

    ``mode`` "binary": W = alpha x sign(V), alpha = mean |V| per output channel (BWN / XNOR-Net); "ternary":
    W = alpha x {-1, 0, +1}, zero where |V| <= threshold x mean |V|, alpha the mean |V| above it (TWN); "int8"
    (the first and last layers) and "int4": W = s x round(V / s), s = max |V| / 127 (7) per output channel.  In
    training the gradient reaches V through a straight-through estimator where |V| <= ``clip`` (the largest |V|
    when the layer was made: weight clipping), and V is clamped there.  ``binary_input``: the input is
    sign(x - shift) times K, the mean of |x - shift| over channels averaged over each output's receptive field
    (XNOR-Net; the trained shift per input channel as ReActNet's RSign)."""

    def __init__(self, layer: nn.Module, mode: str, threshold: float = 0.7, binary_input: bool = False):
        super().__init__()
        self.kind, self.conv = _layer_options(layer)
        self.mode, self.threshold, self.binary_input = mode, float(threshold), bool(binary_input)
        self.latent = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
        self.clip = float(layer.weight.detach().abs().max())
        channels = layer.in_features if self.kind == "linear" else layer.in_channels
        # binary inputs: sign(x - shift), the shift per input channel set from data (``centre``) and trained
        # (ReActNet's RSign); without it a ReLU's output would binarize to all ones
        self.shift = nn.Parameter(torch.zeros(channels, dtype=layer.weight.dtype)) if binary_input else None
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(),
                                                                 requires_grad=layer.bias.requires_grad)

    @property
    def out_channels(self) -> int:
        return self.latent.shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.latent.shape)

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *([1] * (self.latent.dim() - 1)))

    def quantized(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels: the codebook value of every weight, scale per output channel) of the latent weight ``v``."""
        rows = v.detach().reshape(v.shape[0], -1)
        if self.mode == "binary":
            return torch.where(v.detach() >= 0, 1.0, -1.0).to(v.dtype), rows.abs().mean(1)
        if self.mode == "ternary":
            delta = self.threshold * rows.abs().mean(1)
            keep = rows.abs() > delta[:, None]
            alpha = (rows.abs() * keep).sum(1) / keep.sum(1).clamp(min=1)
            return (torch.sign(rows) * keep).reshape(v.shape).to(v.dtype), alpha
        limit = _LIMITS[self.mode]
        scale = (rows.abs().amax(1) / limit).clamp(min=torch.finfo(v.dtype).tiny)
        return torch.round(v.detach() / self._per_channel(scale)).clamp(-limit, limit), scale

    def dense_weight(self) -> torch.Tensor:
        if getattr(self, "fixed_codes", None) is not None:  # (a frozen copy for export)
            w = self.fixed_codebook[self.fixed_codes.long()].reshape(self.weight_shape)
            return w * self._per_channel(self.fixed_scale)
        levels, scale = self.quantized(self.latent.detach().clamp(-self.clip, self.clip))
        w = levels * self._per_channel(scale)
        if not (self.training and torch.is_grad_enabled()):
            return w
        passed = self.latent * (self.latent.detach().abs() <= self.clip)  # the estimator's gradient: 1 inside the clip
        return passed + (w - passed).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense_weight()
        if not self.binary_input:
            return _apply(self.kind, self.conv, x, w, self.bias)
        x = x - self._per_input(self.shift, x)
        y = _apply(self.kind, self.conv, _SignSTE.apply(x), w, None)
        y = y * self._input_scale(x.detach())
        if self.bias is None:
            return y
        return y + (self.bias if self.kind == "linear" else self.bias.reshape(-1, *([1] * (y.dim() - 2))))

    def _per_input(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t if self.kind == "linear" else t.reshape(-1, *([1] * (x.dim() - 2)))

    def _input_scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return x.abs().mean(-1, keepdim=True)
        a = x.abs().mean(1, keepdim=True)
        k = self.latent.shape[2:]
        box = torch.full((1, 1, *k), 1.0 / math.prod(k), dtype=x.dtype, device=x.device)
        options = {key: value for key, value in self.conv.items() if key != "groups"}
        return CONVS[len(k)](a, box, None, **options)

    def centre(self, x: torch.Tensor) -> None:
        """Set the input shift to the mean of each input channel of ``x`` (a batch of this layer's inputs)."""
        dims = [d for d in range(x.dim()) if d != (x.dim() - 1 if self.kind == "linear" else 1)]
        with torch.no_grad():
            self.shift.copy_(x.detach().mean(dims))

    def to_dense(self) -> nn.Module | None:
        """The plain layer with the low-bit weight, or None when the input is binarized (no plain layer does)."""
        if self.binary_input:
            return None
        return _plain(self.kind, self.conv, self.dense_weight().detach(), self.bias, self.latent.requires_grad,
                      self.training)

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        v = self.latent.detach().clamp(-self.clip, self.clip)
        levels, scale = self.quantized(v)
        codebook = torch.tensor(_CODEBOOKS[self.mode], dtype=v.dtype)[:, None]
        codes = torch.searchsorted(codebook[:, 0].contiguous(), levels.reshape(-1).contiguous()).to(torch.uint8)
        return codebook, codes, scale, levels * self._per_channel(scale)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.mode}, weight={self.weight_shape}" + (", binary input" if self.binary_input else "")


# Modules tracing keeps whole (a compiled module traces again as it is).
LEAF_MODULES = (CodebookLayer, LowBitLayer)


def expand_low_bit_layers(root: nn.Module) -> list[str]:
    """Replace every layer of this module under ``root`` that a plain layer computes exactly (``to_dense``: the same
    weight) by that layer; returns their names."""
    names = []
    for name, m in list(root.named_modules()):
        dense = m.to_dense() if isinstance(m, LEAF_MODULES) else None
        if dense is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(root.get_submodule(parent), leaf, dense)
            names.append(name)
    return names


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose ``LowBitLayer``s rebuild their weights from constant codes, codebook and scale as
    a ``CodebookLayer`` does: an exporter folds that into one constant, bit-equal to ``parts()``'s dense weight (a
    plain constant weight would be fused with a following BatchNorm by the exporter)."""
    out = copy.deepcopy(module)
    for m in out.modules():
        if isinstance(m, LowBitLayer):
            codebook, codes, scale, _ = m.parts()
            for name, t in (("fixed_codebook", codebook), ("fixed_codes", codes), ("fixed_scale", scale)):
                m.register_buffer(name, t.clone())
    return out


