"""Channel rules of functions from optional libraries whose blocks call them on their own weights (registered in
``fxcompress/ops.py`` with ``register_library``, once the library is imported).

torchvision's Swin blocks call ``shifted_window_attention(x, qkv.weight, proj.weight, bias, ...)`` and
``_patch_merging_pad(x)`` as functions the graph keeps (``torch.fx.wrap``), and ``_get_relative_position_bias`` on
a table indexed by heads.  The attention relates the input's last dimension to the inputs of the qkv weight and
the outputs of the projection and its bias, and the per-head width to the qkv outputs and the projection's inputs:
torchvision derives that width from the input's (``C // num_heads``), so remove mode calls the equivalent
``fxcompress.modules.window_attention``, which reads it from the weights.
"""
from __future__ import annotations

import torch.fx
from fxcompress.passes.pruning.lib.channel_spaces import Relations

from fxcompress.fxutil import arg


def window_attention(r: Relations, node: torch.fx.Node, _=None) -> None:
    """``shifted_window_attention(input, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads,
    ..., qkv_bias=, proj_bias=, logit_scale=)``: (..., C) -> (..., C) through qkv (3 x heads x head_dim by C) and
    proj (C by heads x head_dim).  The head dim prunes apart from the stream (remove mode calls
    ``fxcompress.modules.window_attention``, which takes the widths from the weights and keeps the query scale);
    the heads stay, indexed as they are by the relative position bias and V2's logit scale."""
    x, qkv_w, proj_w = arg(node, 0, "input"), arg(node, 1, "qkv_weight"), arg(node, 2, "proj_weight")
    qkv_b, proj_b, scale = arg(node, 9, "qkv_bias"), arg(node, 10, "proj_bias"), arg(node, 11, "logit_scale")
    num_heads = arg(node, 5, "num_heads")
    shape, inner = r.shape(x), r.shape(qkv_w)
    if shape is None or inner is None or not isinstance(proj_w, torch.fx.Node) or not isinstance(num_heads, int) \
            or inner[0] % (3 * num_heads):
        return r.barrier(f"{r.where()}: window attention on a non-tensor or with widths that do not split in heads")
    for d in range(len(shape) - 1):
        r.equal(r.sp(x, d), r.out(d))
    r.equal(r.sp(x, -1), r.sp(qkv_w, 1))
    r.equal(r.out(-1), r.sp(proj_w, 0))
    if isinstance(proj_b, torch.fx.Node):
        r.equal(r.out(-1), r.sp(proj_b, 0))
    heads = r.space(f"~{node.name}.heads", 0, num_heads)
    head_dim = r.space(f"~{node.name}.head_dim", 0, inner[0] // (3 * num_heads))
    which = r.space(f"~{node.name}.qkv", 0, 3)
    r.fixed(which, f"{r.where()}: query/key/value selector")
    r.fixed(heads, f"{r.where()}: heads index the relative position bias")
    r.factors(r.sp(qkv_w, 0), [which, heads, head_dim])
    if isinstance(qkv_b, torch.fx.Node):
        r.factors(r.sp(qkv_b, 0), [which, heads, head_dim])
    r.factors(r.sp(proj_w, 1), [heads, head_dim])
    why = f"{r.where()}: indexed by heads and positions, not channels"
    for value in (scale, arg(node, 3, "relative_position_bias")):
        if isinstance(value, torch.fx.Node):
            r.not_channels(value, why)
    r.hook("window_attention")


def patch_merging(r: Relations, node: torch.fx.Node, _=None) -> None:
    """``_patch_merging_pad(x)``: (..., H, W, C) -> (..., H/2, W/2, 4C), the four pixels of each 2x2 patch side by
    side: the output's channels are the input's, four times over; the leading dims map through."""
    x = node.args[0]
    shape = r.shape(x)
    if shape is None or len(shape) < 3:
        return r.barrier(f"{r.where()}: patch merging of a tensor with fewer than 3 dims")
    for d in range(len(shape) - 3):
        r.equal(r.sp(x, d), r.out(d))
    for k in range(4):
        r.part(r.sp(x, -1), r.out(-1), k * shape[-1])


def not_channels(r: Relations, node: torch.fx.Node, _=None) -> None:
    """An op over tensors that hold no channels (a relative position bias, indexed by heads): all stay whole."""
    why = f"{r.where()}: indexed by heads and positions, not channels"
    for value in [*node.all_input_nodes, node]:
        r.not_channels(value, why)


RULES = {"window_attention": window_attention, "patch_merging": patch_merging, "not_channels": not_channels}
