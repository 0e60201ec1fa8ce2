"""Channel rules of layers with parameters: convolutions, Linear, normalisations, Embedding, attention."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from fxcompress.passes.pruning.lib.channel_spaces import GroupedInput, Relations, reduce_over, unary

from fxcompress import meta
from fxcompress.fxutil import arg


def conv(r: Relations, node: torch.fx.Node, m: nn.modules.conv._ConvNd) -> None:
    x = node.args[0]
    shape = r.shape(x)
    spatial = len(m.kernel_size)
    c = len(shape) - spatial - 1  # channel dim (0 when unbatched)
    for d in range(c):
        r.equal(r.sp(x, d), r.out(d))
    target = node.target
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    g = m.groups
    w_out, w_in = (1, 0) if transposed else (0, 1)
    cin, cout = m.in_channels, m.out_channels
    if m.bias is not None:
        r.equal(r.out(c), r.param_space(f"{target}.bias", 0, "out", target))
    if g == 1:
        r.equal(r.sp(x, c), r.param_space(f"{target}.weight", w_in, "in", target))
        r.equal(r.out(c), r.param_space(f"{target}.weight", w_out, "out", target))
        return
    if cin == g:  # depthwise: input channel i feeds outputs i*mult .. (i+1)*mult - 1
        mult = cout // g
        weight = r.param_space(f"{target}.weight", 1 if transposed else 0, "out", target)
        if transposed:  # weight (in, out/g, *k): dim 0 is per input channel
            r.equal(r.sp(x, c), r.param_space(f"{target}.weight", 0, "out", target))
        if mult == 1:
            r.equal(r.sp(x, c), r.out(c))
            if not transposed:
                r.equal(r.out(c), weight)
            return
        virtual = r.space(f"~{target}.multiplier", 0, mult)
        r.fixed(virtual, f"{target}: depthwise channel multiplier")
        r.factors(r.out(c), [r.sp(x, c), virtual])
        if not transposed:
            r.factors(weight, [r.sp(x, c), virtual])
        return
    # grouped: per-group output channels are the weight's out dim; inputs are read per group
    if transposed:
        r.barrier(f"{target}: grouped transposed conv")
        return
    r.equal(r.out(c), r.param_space(f"{target}.weight", 0, "out", target))
    r.grouped(r.out(c), g)
    r.grouped(r.sp(x, c), g)
    r.grouped_inputs[r.sp(x, c)] = GroupedInput(target, g, transposed)


def functional_conv(r: Relations, node: torch.fx.Node, _=None) -> None:
    x, w = node.args[0], arg(node, 1, "weight")
    b = arg(node, 2, "bias")
    groups = arg(node, 6, "groups", 1)
    transposed = "transpose" in node.target.__name__
    if not isinstance(w, torch.fx.Node) or not isinstance(groups, int) or (groups != 1 and transposed):
        return r.barrier(f"{r.where()}: functional conv with groups={groups}" + (" (transposed)" if transposed else ""))
    w_out, w_in = (1, 0) if transposed else (0, 1)
    c = 1 if len(r.shape(x)) == len(r.shape(w)) else 0
    for d in range(c):
        r.equal(r.sp(x, d), r.out(d))
    if isinstance(b, torch.fx.Node):
        r.equal(r.out(c), r.sp(b, 0))
    if groups == 1:
        r.equal(r.sp(x, c), r.sp(w, w_in))
        r.equal(r.out(c), r.sp(w, w_out))
        return
    # grouped (timm's weight-standardised convs): the weight is computed, so the call keeps its groups and every
    # group loses the same offsets, of its inputs (weight dim 1) and of its outputs; depthwise: input i feeds
    # outputs i*mult .. (i+1)*mult - 1
    r.equal(r.out(c), r.sp(w, 0))
    cin, cout = r.shape(x)[c], r.shape(w)[0]
    mult = cout // groups
    if cin == groups:
        r.hook("functional_depthwise")  # remove mode: groups = the new input width
        if mult == 1:
            r.equal(r.sp(x, c), r.out(c))
            return
        virtual = r.space(f"~{node.name}.multiplier", 0, mult)
        r.fixed(virtual, f"{r.where()}: depthwise channel multiplier")
        r.factors(r.out(c), [r.sp(x, c), virtual])
        return
    for side, space, per_group in (("in", r.sp(x, c), r.sp(w, 1)), ("out", r.out(c), None)):
        block = r.space(f"~{node.name}.groups_{side}", 0, groups)
        r.position(block, f"{r.where()}: conv groups (every group loses the same offsets)")  # a count, no channels
        r.factors(space, [block, per_group if per_group is not None else r.space(f"~{node.name}.per_group", 0, mult)])


def linear(r: Relations, node: torch.fx.Node, m: nn.Linear) -> None:
    x = node.args[0]
    n = len(r.shape(x))
    for d in range(n - 1):
        r.equal(r.sp(x, d), r.out(d))
    r.equal(r.sp(x, -1), r.param_space(f"{node.target}.weight", 1, "in", node.target))
    r.equal(r.out(-1), r.param_space(f"{node.target}.weight", 0, "out", node.target))
    if m.bias is not None:
        r.equal(r.out(-1), r.param_space(f"{node.target}.bias", 0, "out", node.target))


def functional_linear(r: Relations, node: torch.fx.Node, _=None) -> None:
    x, w, b = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
    for d in range(len(r.shape(x)) - 1):
        r.equal(r.sp(x, d), r.out(d))
    r.equal(r.sp(x, -1), r.sp(w, 1))
    r.equal(r.out(-1), r.sp(w, 0))
    if isinstance(b, torch.fx.Node):
        r.equal(r.out(-1), r.sp(b, 0))


def matmul(r: Relations, node: torch.fx.Node, _=None) -> None:
    a, b = node.args[0], node.args[1]
    sa, sb, so = r.shape(a), r.shape(b), r.shape(node)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return r.barrier(f"{r.where()}: matmul of a vector or a non-tensor")
    r.equal(r.sp(a, -1), r.sp(b, -2))  # contracted
    r.equal(r.sp(a, -2), r.out(-2))
    r.equal(r.sp(b, -1), r.out(-1))
    for x, s in ((a, sa), (b, sb)):
        for k in range(len(s) - 2):
            d = len(so) - len(s) + k
            if s[k] == so[d]:
                r.equal(r.sp(x, k), r.out(d))


def addmm(r: Relations, node: torch.fx.Node, _=None) -> None:
    """``addmm(bias, x, w)``: a matmul of two matrices plus a bias broadcast over its result (a linear layer with its
    weight stored input-major, as transformers' ``Conv1D`` in GPT-2 keeps it)."""
    bias, x, w = (arg(node, i, name) for i, name in enumerate(("input", "mat1", "mat2")))
    if not all(isinstance(t, torch.fx.Node) and r.shape(t) is not None and len(r.shape(t)) == 2 for t in (x, w)):
        return r.barrier(f"{r.where()}: addmm of non-matrices")
    r.equal(r.sp(x, 1), r.sp(w, 0))  # contracted
    r.equal(r.sp(x, 0), r.out(0))
    r.equal(r.sp(w, 1), r.out(1))
    if isinstance(bias, torch.fx.Node) and r.shape(bias) is not None:
        sb = r.shape(bias)
        for k, size in enumerate(sb):
            d = 2 - len(sb) + k
            if size == r.shape(node)[d]:
                r.equal(r.sp(bias, k), r.out(d))


def batchnorm(r: Relations, node: torch.fx.Node, m: nn.Module) -> None:
    unary(r, node)
    x = node.args[0]
    c = 1 if len(r.shape(x)) > 1 else 0
    for name in ("weight", "bias"):
        if getattr(m, name, None) is not None:
            r.equal(r.out(c), r.param_space(f"{node.target}.{name}", 0, "norm", node.target))
    for name in ("running_mean", "running_var"):
        if getattr(m, name, None) is not None:
            r.equal(r.out(c), r.param_space(f"{node.target}.{name}", 0, "buffer", node.target))


def functional_batchnorm(r: Relations, node: torch.fx.Node, _=None) -> None:
    """``F.batch_norm``: per channel (dim 1); with batch statistics (``training=True`` or no running statistics, as
    weight standardisation calls it on a weight reshaped to (1, out, in x k x k)) it normalises over every other
    dim, which pruning those changes: inexact there."""
    unary(r, node)
    for i, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        p = arg(node, i, name)
        if isinstance(p, torch.fx.Node):
            r.equal(r.out(1), r.sp(p, 0))
    if arg(node, 5, "training") is not False or not isinstance(arg(node, 1, "running_mean"), torch.fx.Node):
        for d in range(len(r.shape(node))):
            if d != 1:
                r.inexact(r.out(d), f"{r.where()}: batch statistics normalise over this dim")


def layernorm(r: Relations, node: torch.fx.Node, m: nn.LayerNorm) -> None:
    unary(r, node)
    k = len(m.normalized_shape)
    n = len(r.shape(node))
    for j in range(k):
        d = n - k + j
        r.inexact(r.out(d), f"{node.target} (LayerNorm) normalises over this dim")
        for name in ("weight", "bias"):
            if getattr(m, name, None) is not None:
                r.equal(r.out(d), r.param_space(f"{node.target}.{name}", j, "norm", node.target))
    r.hook("layernorm")


def functional_layernorm(r: Relations, node: torch.fx.Node, _=None) -> None:
    unary(r, node)
    shape = arg(node, 1, "normalized_shape")
    k = len(shape)
    n = len(r.shape(node))
    for j in range(k):
        r.inexact(r.out(n - k + j), f"{r.where()} normalises over this dim")
        for i, name in ((2, "weight"), (3, "bias")):
            p = arg(node, i, name)
            if isinstance(p, torch.fx.Node):
                r.equal(r.out(n - k + j), r.sp(p, j))
    r.hook("layernorm")


def groupnorm(r: Relations, node: torch.fx.Node, m: nn.GroupNorm) -> None:
    unary(r, node)
    if m.num_groups != m.num_channels:
        r.inexact(r.out(1), f"{node.target} (GroupNorm) normalises over groups of channels")
    r.grouped(r.out(1), m.num_groups)
    if m.affine:
        for name in ("weight", "bias"):
            r.equal(r.out(1), r.param_space(f"{node.target}.{name}", 0, "norm", node.target))


def functional_groupnorm(r: Relations, node: torch.fx.Node, _=None) -> None:
    """``F.group_norm(x, num_groups, weight, bias)``: as ``nn.GroupNorm`` (timm's GroupNorm1 calls it)."""
    x, groups, w, b = node.args[0], arg(node, 1, "num_groups"), arg(node, 2, "weight"), arg(node, 3, "bias")
    if not isinstance(groups, int) or r.shape(x) is None or len(r.shape(x)) < 2:
        return r.barrier(f"{r.where()}: group_norm with a computed number of groups")
    unary(r, node)
    if groups != r.shape(x)[1]:
        r.inexact(r.out(1), f"{r.where()}: group_norm normalises over groups of channels")
    r.grouped(r.out(1), groups)
    for p in (w, b):
        if isinstance(p, torch.fx.Node):
            r.equal(r.out(1), r.sp(p, 0))


def _zeros_add_nothing(p: Any) -> bool:
    """Whether a zeroed channel adds nothing to a p-norm (p > 0; torch's default p is 2, ``"fro"`` the same)."""
    p = 2.0 if p is None or p == "fro" else p
    return isinstance(p, (int, float)) and p > 0


def lp_normalize(r: Relations, node: torch.fx.Node, _=None) -> None:
    """``F.normalize(x, p, dim)``: elementwise in its channels, and exact under pruning even over the normalised
    dim, as a removed (zeroed) channel adds nothing to a p-norm with p > 0 (SwiftFormer's additive attention)."""
    p = arg(node, 1, "p")
    unary(r, node)
    if not _zeros_add_nothing(p):
        dim = arg(node, 2, "dim")
        r.inexact(r.out(1 if dim is None else dim), f"{r.where()}: a norm with p={p} counts zeroed channels")


def p_norm(r: Relations, node: torch.fx.Node, _=None) -> None:
    """``torch.norm(x, p, dim)``, ``torch.linalg.vector_norm(x, ord, dim)``: a reduction over ``dim``, exact over
    channels for p > 0, as a zeroed channel adds nothing (ConvNeXt-V2's global response norm over the positions)."""
    p = arg(node, 1, "ord" if "vector_norm" in getattr(node.target, "__name__", "") else "p")
    reduce_over(r, node, arg(node, 2, "dim"), exact=_zeros_add_nothing(p))


def prelu(r: Relations, node: torch.fx.Node, m: nn.PReLU) -> None:
    unary(r, node)
    if m.num_parameters > 1:
        r.equal(r.out(1), r.param_space(f"{node.target}.weight", 0, "norm", node.target))


def embedding(r: Relations, node: torch.fx.Node, m: nn.Embedding) -> None:
    x = node.args[0]
    for d in range(len(r.shape(x))):
        r.equal(r.sp(x, d), r.out(d))
    r.equal(r.out(-1), r.param_space(f"{node.target}.weight", 1, "out", node.target))


def pixel_shuffle(r: Relations, node: torch.fx.Node, m: Any = None) -> None:
    """PixelShuffle(s): input channel c*s*s + k becomes output channel c; Unshuffle the reverse."""
    x = node.args[0]
    shape = r.shape(x)
    shuffle = isinstance(m, nn.PixelShuffle) or node.target is F.pixel_shuffle
    s = (m.upscale_factor if shuffle else m.downscale_factor) if isinstance(m, nn.Module) else node.args[1]
    c = len(shape) - 3
    for d in range(c):
        r.equal(r.sp(x, d), r.out(d))
    where = node.target if isinstance(node.target, str) else node.name
    virtual = r.space(f"~{where}.block", 0, s * s)
    r.fixed(virtual, f"{where}: sub-pixel position")
    if shuffle:
        r.factors(r.sp(x, c), [r.out(c), virtual])
    else:
        r.factors(r.out(c), [r.sp(x, c), virtual])


def glu(r: Relations, node: torch.fx.Node, _=None) -> None:
    x = node.args[0]
    dim = arg(node, 1, "dim", -1) % len(r.shape(x))
    half = r.shape(node)[dim]
    for d in range(len(r.shape(x))):
        if d == dim:
            r.part(r.out(d), r.sp(x, d), 0)
            r.part(r.out(d), r.sp(x, d), half)
        else:
            r.equal(r.sp(x, d), r.out(d))


def multihead_attention(r: Relations, node: torch.fx.Node, m: nn.MultiheadAttention) -> None:
    """nn.MultiheadAttention: embed dims of query/key/value and output, heads and per-head dims as factors."""
    t = node.target
    if not getattr(m, "_qkv_same_embed_dim", True) or getattr(m, "bias_k", None) is not None \
            or getattr(m, "add_zero_attn", False):
        return r.barrier(f"{t}: MultiheadAttention with kdim/vdim, bias_k or add_zero_attn")
    q, k, v = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    outs = node.meta.get(meta.TENSOR)
    out = f"{node.name}.0"
    sq = r.shape(q)
    e_in = r.param_space(f"{t}.in_proj_weight", 1, "in", t)
    for x in (q, k, v):
        r.equal(r.sp(x, -1), e_in)
    for d in range(len(sq) - 1):
        r.equal(r.sp(q, d), r.space(out, d, outs[0].shape[d]))
    out_e = r.space(out, len(sq) - 1, outs[0].shape[-1])
    r.equal(out_e, r.param_space(f"{t}.out_proj.weight", 0, "out", t))
    if m.out_proj.bias is not None:
        r.equal(out_e, r.param_space(f"{t}.out_proj.bias", 0, "out", t))
    heads = r.space(f"~{t}.heads", 0, m.num_heads)
    head_dim = r.space(f"~{t}.head_dim", 0, m.head_dim)
    which = r.space(f"~{t}.qkv", 0, 3)
    r.fixed(which, f"{t}: query/key/value selector")
    r.factors(r.param_space(f"{t}.in_proj_weight", 0, "out", t), [which, heads, head_dim])
    if m.in_proj_bias is not None:
        r.factors(r.param_space(f"{t}.in_proj_bias", 0, "out", t), [which, heads, head_dim])
    r.factors(r.param_space(f"{t}.out_proj.weight", 1, "in", t), [heads, head_dim])
    r.hook("attention")
    if isinstance(outs[1], meta.TensorInfo):  # attention weights: heads averaged or per head
        r.fix_all(node, f"{t}: attention weights are an output")
        r.fixed_spaces.pop(out_e, None)
        for d in range(len(sq) - 1):
            r.fixed_spaces.pop((out, d), None)


def sdpa(r: Relations, node: torch.fx.Node, _=None) -> None:
    q, k, v = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    r.equal(r.sp(q, -1), r.sp(k, -1))
    r.equal(r.sp(v, -1), r.out(-1))
    r.equal(r.sp(q, -2), r.out(-2))
    r.equal(r.sp(k, -2), r.sp(v, -2))
    r.fixed(r.sp(k, -2), f"{r.where()}: the keys' tokens (its softmax normalises over them), not channels")
    so = r.shape(node)
    for x in (q, k, v):
        s = r.shape(x)
        for j in range(len(s) - 2):
            d = len(so) - len(s) + j
            if s[j] == so[d]:
                r.equal(r.sp(x, j), r.out(d))
    mask = arg(node, 3, "attn_mask")  # an additive bias or a mask over the scores (B.., query tokens, key tokens)
    sm = r.shape(mask) if isinstance(mask, torch.fx.Node) else None
    if sm is not None and len(sm) >= 2:
        if sm[-1] == r.shape(k)[-2]:
            r.equal(r.sp(mask, -1), r.sp(k, -2))
        if sm[-2] == so[-2]:
            r.equal(r.sp(mask, -2), r.out(-2))
        for j in range(len(sm) - 2):  # leading dims broadcast against the output's (a head's bias per head)
            d = len(so) - len(sm) + j
            if d >= 0 and sm[j] == so[d]:
                r.equal(r.sp(mask, j), r.out(d))
    r.hook("sdpa")


def repeat(r: Relations, node: torch.fx.Node, _=None) -> None:
    """Tiling: output element e of a repeated dim is input element e % n."""
    x = node.args[0]
    shape, out = r.shape(x), r.shape(node)
    extra = len(out) - len(shape)
    for k, size in enumerate(shape):
        d = k + extra
        if out[d] == size:  # the repeat counts are read from the shapes: they may be traced values (xcit)
            r.equal(r.sp(x, k), r.out(d))
        else:
            tile = r.space(f"~{node.name}.tile{d}", 0, out[d] // size)
            r.fixed(tile, f"{r.where()}: tile index")
            r.factors(r.out(d), [tile, r.sp(x, k)])


def recurrent(r: Relations, node: torch.fx.Node, m: nn.Module) -> None:
    r.barrier(f"{node.target} ({type(m).__name__}): recurrent layers are not pruned")
