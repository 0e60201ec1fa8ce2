"""Modules the rewrites put into a model: plain PyTorch, exportable to ONNX.

``Observer`` passes its input through unchanged while a calibrator records its statistics.

``inconsistent_attributes`` checks that every standard layer's attributes (``out_channels``, ``num_features``...)
agree with its tensors, the postcondition of every rewrite that resizes layers.

``PrunedMultiheadAttention`` stands in for an ``nn.MultiheadAttention`` after channel removal: its embedding
width (input and output) and its inner width (heads × head_dim) may differ, and it keeps the softmax scale of
the original model rather than recomputing it from the (smaller) head dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class PrunedMultiheadAttention(nn.Module):
    """Same call signature and outputs as ``nn.MultiheadAttention`` (self- or cross-attention)."""

    def __init__(self, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor | None, out_proj: nn.Linear,
                 num_heads: int, head_dim: int, scale: float, batch_first: bool, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.batch_first, self.dropout = batch_first, dropout
        self.in_proj_weight = nn.Parameter(in_proj_weight.detach().clone())
        self.in_proj_bias = None if in_proj_bias is None else nn.Parameter(in_proj_bias.detach().clone())
        self.out_proj = out_proj

    @classmethod
    def from_module(cls, m: nn.MultiheadAttention, num_heads: int, head_dim: int) -> PrunedMultiheadAttention:
        scale = getattr(m, "scale", None) or 1.0 / math.sqrt(m.head_dim)
        return cls(m.in_proj_weight, m.in_proj_bias, m.out_proj, num_heads, head_dim, scale, m.batch_first,
                   m.dropout)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        tgt, bsz, _ = query.shape
        src = key.shape[0]
        inner = self.num_heads * self.head_dim
        w = self.in_proj_weight
        b = self.in_proj_bias if self.in_proj_bias is not None else None
        bq, bk, bv = (None, None, None) if b is None else (b[:inner], b[inner:2 * inner], b[2 * inner:])
        q = F.linear(query, w[:inner], bq)
        k = F.linear(key, w[inner:2 * inner], bk)
        v = F.linear(value, w[2 * inner:], bv)
        q = q.reshape(tgt, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        k = k.reshape(src, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        v = v.reshape(src, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        scores = torch.bmm(q * self.scale, k.transpose(1, 2))
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
            scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask
        if key_padding_mask is not None:
            scores = scores.view(bsz, self.num_heads, tgt, src)
            kpm = key_padding_mask.view(bsz, 1, 1, src)
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
            scores = scores.view(bsz * self.num_heads, tgt, src)
        attn = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, p=self.dropout)
        out = torch.bmm(attn, v).transpose(0, 1).reshape(tgt, bsz, inner)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = attn.view(bsz, self.num_heads, tgt, src)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            weights = weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        return (f"in={self.in_proj_weight.shape[1]}, heads={self.num_heads}, head_dim={self.head_dim}, "
                f"out={self.out_proj.out_features}, scale={self.scale:.4g}, batch_first={self.batch_first}")


class Observer(nn.Module):
    """Records the statistics of the tensor flowing through it and returns that tensor unchanged.

    ``spec`` is a ``QuantSpec``; the calibrator it names (``MinMax`` or ``Histogram``) accumulates every batch
    while ``enabled``.  ``qparams()`` gives the scale and zero point for the spec.
    """

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.calibrator = spec.calibrator()
        self.enabled = True
        self.batches = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and isinstance(x, torch.Tensor) and x.numel():  # an empty tensor (no RoIs) has no range
            self.calibrator.update(x)
            self.batches += 1
        return x

    def extra_repr(self) -> str:
        return f"{self.spec}, batches={self.batches}"


class NarrowAccumulator(nn.Module):
    """Saturates an integer accumulator of ``bits`` bits: the output of a quantized Conv/Linear computed without
    its bias is ``acc * scale`` with ``acc`` the integer sum of products; ``acc`` is clamped to the signed range,
    then the bias is added.  Counts how many accumulator values fell outside the range.

    ``scale`` (input scale x weight scale) is 0-d or one value per output channel along ``axis``.
    """

    def __init__(self, scale: torch.Tensor, bits: int, axis: int):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().float())
        self.bits, self.axis = bits, axis
        self.limit = 2 ** (bits - 1)
        self.overflows = 0
        self.total = 0

    def _along_axis(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            return t
        shape = [1] * like.dim()
        shape[self.axis] = -1
        return t.view(shape)

    def forward(self, y: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        scale = self._along_axis(self.scale, y)
        acc = torch.round(y / scale)
        outside = (acc < -self.limit) | (acc > self.limit - 1)
        self.overflows += int(outside.sum())
        self.total += acc.numel()
        out = acc.clamp(-self.limit, self.limit - 1) * scale
        return out if bias is None else out + self._along_axis(bias, y)

    def reset_counts(self) -> None:
        self.overflows = self.total = 0

    def overflow_rate(self) -> float:
        return self.overflows / self.total if self.total else 0.0

    def extra_repr(self) -> str:
        return f"bits={self.bits}, axis={self.axis}"


class _DynamicQuantLinear(torch.autograd.Function):
    """Linear with int8 weights and activations quantized per batch, as ONNX Runtime computes it.

    The activation is quantized like ONNX's DynamicQuantizeLinear (uint8, affine, range from the batch's min and
    max widened to contain 0); the integer product is scaled back by activation scale x weight scale (per
    output channel).  Exported as DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (-> Add), the pattern ORT
    fuses into its DynamicQuantizeMatMul kernel.
    """

    @staticmethod
    def forward(ctx, x, weight, weight_zero, scale, bias):
        lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
        x_scale = (hi - lo) / 255.0
        x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))
        x_zero = torch.clamp(torch.round(-lo / x_scale), 0, 255)
        xq = torch.clamp(torch.round(x / x_scale) + x_zero, 0, 255) - x_zero
        out = torch.matmul(xq, weight.float().t()) * (x_scale * scale)
        return out if bias is None else out + bias

    @staticmethod
    def symbolic(g, x, weight, weight_zero, scale, bias):
        xq, x_scale, x_zero = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("MatMulInteger", xq, g.op("Transpose", weight, perm_i=[1, 0]), x_zero, weight_zero)
        out = g.op("Mul", g.op("Cast", acc, to_i=1), g.op("Mul", x_scale, scale))  # to_i=1: FLOAT
        return out if bias is None or bias.node().mustBeNone() else g.op("Add", out, bias)


def bias_step(x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The scale of a quantized layer's int32 bias and accumulator: input scale x weight scale (per output channel
    when the weight is), in float32, the grid QLinearConv and QGemm add the bias on.  The lowering rounds biases to
    it and the QDQ export stores them as codes on it: one definition, so the export converts them exactly."""
    return (x_scale * w_scale).float()


def dynamic_quant_linear(x: torch.Tensor, weight: torch.Tensor, weight_zero: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with int8 ``weight`` (zero points ``weight_zero``, per-row ``scale``) and dynamically
    quantized uint8 activations."""
    return _DynamicQuantLinear.apply(x, weight, weight_zero, scale, bias)


def quantized_embedding(ids: torch.Tensor, table: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``F.embedding`` of an int8 ``table`` with a ``scale`` per row (rows x 1): only the rows looked up are
    dequantized.  Exported to ONNX as a Gather of the int8 table times a Gather of the scales."""
    return F.embedding(ids, table).to(scale.dtype) * F.embedding(ids, scale)


_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_FLOAT32_EXACT = 1 << 24  # integers up to 2^24 are exact in float32


def requantized_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x_scale: torch.Tensor | float,
                     w_scale: torch.Tensor | float, y_scale: torch.Tensor | float, y_zero: torch.Tensor | int,
                     y_min: int, y_max: int,
                     stride, padding, dilation, groups: int) -> torch.Tensor:
    """A quantized convolution computed as ONNX Runtime's QLinearConv computes it, for the PyTorch simulation.

    ``x``, ``weight`` and ``bias`` are fake-quantized (on their grids: x_scale, w_scale per output channel or per
    tensor, x_scale x w_scale for the bias).  The integer accumulator sum(x_int w_int) + bias_int is exact (float32
    when the largest possible sum fits in 24 bits, else float64); it is requantized with the float32 multiplier
    (x_scale x w_scale) / y_scale, rounded half to even, shifted by the zero point and clamped: the result is the
    output's grid value, so the activation and output fake-quantization after it change nothing.  Rounding the
    float convolution instead differs from ONNX Runtime wherever a value lies within float error of a rounding
    boundary, and in deep networks those flips grow.

    Exported to ONNX it is the plain convolution of its (dequantized) inputs: ONNX Runtime fuses that with the
    surrounding QuantizeLinear/DequantizeLinear into QLinearConv.
    """
    conv = _CONVS[weight.dim() - 2]
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return conv(x, weight, bias, stride, padding, dilation, groups)
    channels = weight.shape[0]
    shape = (1, channels) + (1,) * (weight.dim() - 2)
    xs = torch.as_tensor(x_scale, dtype=torch.float32)
    ys = torch.as_tensor(y_scale, dtype=torch.float32)
    ws = torch.as_tensor(w_scale, dtype=torch.float32).reshape(-1)
    ws = ws.expand(channels) if ws.numel() == 1 else ws
    terms = weight[0].numel()
    dtype = torch.float32 if terms * 255 * 127 < _FLOAT32_EXACT else torch.float64
    x_int = torch.round(x / xs).to(dtype)
    w_int = torch.round(weight / ws.reshape(-1, *([1] * (weight.dim() - 1)))).to(dtype)
    acc = conv(x_int, w_int, None, stride, padding, dilation, groups)
    if bias is not None:
        acc = acc + torch.round(bias / (xs * ws)).to(dtype).reshape(shape)
    multiplier = (xs * ws) / ys
    q = torch.round(acc.to(torch.float32) * multiplier.reshape(shape))
    return (torch.clamp(q + y_zero, y_min, y_max) - y_zero) * ys


def _integer_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The integer codes (float64) of a tensor that lies on the grid of ``scale`` and ``zero``."""
    return (torch.round(x / scale) + zero).to(torch.float64)


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fused multiply-add: a * b + c rounded once.  Exact in float64 first (an 8-bit code times a float32
    and a float32 of similar magnitude need fewer than 53 bits), then one rounding to float32."""
    return (a.to(torch.float64) * b.to(torch.float64) + c.to(torch.float64)).to(torch.float32)


def quantized_add(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor,
                  b_scale: torch.Tensor, b_zero: torch.Tensor, y_scale: torch.Tensor, y_zero: torch.Tensor,
                  y_min: int, y_max: int) -> torch.Tensor:
    """The sum of two quantized tensors, requantized as ONNX Runtime's QLinearAdd (x86) computes it.

    ORT fuses DequantizeLinear, DequantizeLinear -> Add -> QuantizeLinear into QLinearAdd, which works on the integer
    codes with float32 ratios r_a = s_a / s_y, r_b = s_b / s_y and fused multiply-adds:
    ``y = rint(fma(q_a, r_a, fma(q_b, r_b, z_y - fma(r_a, z_a, r_b z_b))))``, clamped.  Adding the dequantized
    floats and quantizing the sum differs from that in a few values per million, and deep residual stacks grow those
    flips into whole output steps.  Exported, it is the plain add that ORT fuses back.
    """
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return a + b
    f32 = torch.float32
    sa, sb, sy = (t.to(f32) for t in (a_scale, b_scale, y_scale))
    za, zb, zy = (t.to(f32) for t in (a_zero, b_zero, y_zero))
    ra, rb = sa / sy, sb / sy
    fixed = zy - _fma32(ra, za, rb * zb)
    acc = _fma32(_integer_codes(a, sa, za), ra, _fma32(_integer_codes(b, sb, zb), rb, fixed))
    q = torch.clamp(torch.round(acc), y_min, y_max)
    return (q - zy) * sy


def window_attention(input: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                     relative_position_bias: torch.Tensor, window_size: list[int], num_heads: int,
                     shift_size: list[int], attention_dropout: float = 0.0, dropout: float = 0.0,
                     qkv_bias: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
                     logit_scale: torch.Tensor | None = None, training: bool = True,
                     head_scale: float | None = None) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` (Swin V1 and V2: the same arguments, the same numbers) with the
    widths taken from the weights instead of the input: per-head width ``qkv_weight.shape[0] // (3 * num_heads)``,
    output width ``proj_weight.shape[0]``, so that channel removal can narrow the heads apart from the residual
    stream.  ``head_scale`` is the query scale of V1 (default: the per-head width ** -0.5; a pruned model keeps its
    original one)."""
    B, H, W, C = input.shape
    wh, ww = window_size
    x = F.pad(input, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
    ph, pw = x.shape[1], x.shape[2]
    sh = 0 if wh >= ph else shift_size[0]  # a window as large as the map does not shift
    sw = 0 if ww >= pw else shift_size[1]
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    nh, nw = ph // wh, pw // ww
    tokens = wh * ww
    x = x.view(B, nh, wh, nw, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, tokens, C)
    if logit_scale is not None and qkv_bias is not None:  # V2: no key bias
        third = qkv_bias.numel() // 3
        qkv_bias = torch.cat([qkv_bias[:third], torch.zeros_like(qkv_bias[third:2 * third]), qkv_bias[2 * third:]])
    head_dim = qkv_weight.shape[0] // (3 * num_heads)
    q, k, v = F.linear(x, qkv_weight, qkv_bias).reshape(x.size(0), tokens, 3, num_heads, head_dim) \
        .permute(2, 0, 3, 1, 4)
    if logit_scale is not None:  # V2: cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (head_dim ** -0.5 if head_scale is None else head_scale)).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sh or sw:  # tokens from different regions of the rolled map do not attend to each other
        def regions(n: int, window: int, shift: int) -> torch.Tensor:  # one region where that axis does not shift
            i = torch.arange(n, device=x.device)
            return (i >= n - window).long() + (i >= n - shift).long() if shift else torch.zeros_like(i)
        region = (regions(ph, wh, sh)[:, None] * 3 + regions(pw, ww, sw)[None, :]).to(x.dtype)
        region = region.view(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nh * nw, tokens)
        mask = region.unsqueeze(1) - region.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(B, nh * nw, num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), tokens, num_heads * head_dim)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    out = proj_weight.shape[0]
    x = x.view(B, nh, nw, wh, ww, out).permute(0, 1, 3, 2, 4, 5).reshape(B, ph, pw, out)
    if sh or sw:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


torch.fx.wrap("window_attention")

# Functions the rewrites put into graphs: ``fxc.load`` accepts them by name (``persist``), tracing keeps them whole.
_QUANTIZED_FUNCTIONS = (requantized_conv, quantized_add, dynamic_quant_linear, quantized_embedding)
GRAPH_FUNCTIONS = (*_QUANTIZED_FUNCTIONS, window_attention)
_QUANTIZED_TARGETS = (torch.fake_quantize_per_tensor_affine, torch.fake_quantize_per_channel_affine,
                      *_QUANTIZED_FUNCTIONS)


def quantization_stage(gm: torch.fx.GraphModule) -> tuple[str, torch.fx.Node] | None:
    """``("observed", node)`` when observers sit in the graph, ``("quantized", node)`` when it computes quantized
    values (fake-quantization, the integer simulations), else None; ``node`` is the first such node."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), Observer):
            return "observed", node
        if node.op == "call_function" and node.target in _QUANTIZED_TARGETS:
            return "quantized", node
    return None


def _shape(m: nn.Module, name: str) -> tuple[int, ...] | None:
    t = getattr(m, name, None)
    if not isinstance(t, torch.Tensor) or isinstance(t, nn.parameter.UninitializedTensorMixin):
        return None
    return tuple(t.shape)


def _layer_problems(m: nn.Module) -> list[str]:
    """What disagrees between ``m``'s attributes and its tensors' shapes (empty: consistent)."""
    w, b = _shape(m, "weight"), _shape(m, "bias")
    if isinstance(m, nn.modules.conv._ConvNd):
        if w is None:
            return []
        transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
        rows, cols = (m.in_channels, m.out_channels // m.groups) if transposed else \
            (m.out_channels, m.in_channels // m.groups)
        problems = [] if w[:2] == (rows, cols) else [f"weight {list(w)} for in_channels={m.in_channels}, "
                                                      f"out_channels={m.out_channels}, groups={m.groups}"]
        if m.in_channels % m.groups or m.out_channels % m.groups:
            problems.append(f"channels {m.in_channels}/{m.out_channels} not divisible by groups={m.groups}")
        if b is not None and b != (m.out_channels,):
            problems.append(f"bias {list(b)} for out_channels={m.out_channels}")
        return problems
    if isinstance(m, nn.Linear):
        problems = [] if w in (None, (m.out_features, m.in_features)) else \
            [f"weight {list(w)} for in_features={m.in_features}, out_features={m.out_features}"]
        return problems + ([f"bias {list(b)} for out_features={m.out_features}"]
                           if b is not None and b != (m.out_features,) else [])
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return [f"{name} {list(shape)} for num_features={m.num_features}"
                for name in ("weight", "bias", "running_mean", "running_var")
                if (shape := _shape(m, name)) is not None and shape != (m.num_features,)]
    if isinstance(m, nn.GroupNorm):
        problems = [f"{name} {list(shape)} for num_channels={m.num_channels}" for name in ("weight", "bias")
                    if (shape := _shape(m, name)) is not None and shape != (m.num_channels,)]
        return problems + ([f"num_channels={m.num_channels} not divisible by num_groups={m.num_groups}"]
                           if m.num_channels % m.num_groups else [])
    if isinstance(m, nn.LayerNorm):
        return [f"{name} {list(shape)} for normalized_shape={list(m.normalized_shape)}" for name in ("weight", "bias")
                if (shape := _shape(m, name)) is not None and shape != tuple(m.normalized_shape)]
    if isinstance(m, nn.Embedding):
        return [] if w in (None, (m.num_embeddings, m.embedding_dim)) else \
            [f"weight {list(w)} for num_embeddings={m.num_embeddings}, embedding_dim={m.embedding_dim}"]
    if isinstance(m, nn.MultiheadAttention):
        problems = [] if m.embed_dim % m.num_heads == 0 else [f"embed_dim={m.embed_dim} not divisible by "
                                                               f"num_heads={m.num_heads}"]
        w = _shape(m, "in_proj_weight")
        if w is not None and w != (3 * m.embed_dim, m.embed_dim):
            problems.append(f"in_proj_weight {list(w)} for embed_dim={m.embed_dim}")
        return problems
    return []


def inconsistent_attributes(root: nn.Module) -> list[str]:
    """"module: what disagrees" for every standard layer under ``root`` whose attributes do not match its tensors."""
    return [f"{name or type(root).__name__}: {problem}" for name, m in root.named_modules()
            for problem in _layer_problems(m)]
