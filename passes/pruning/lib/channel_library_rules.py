"""Channel rules of functions from optional libraries whose blocks call them on their own weights (registered in
``fxcompress/ops.py`` with ``register_library``, once the library is imported).

torchvision's Swin blocks call ``shifted_window_attention(x, qkv.weight, proj.weight, bias, ...)`` and
``_patch_merging_pad(x)`` as functions the graph keeps (``torch.fx.wrap``), and ``_get_relative_position_bias`` on
a table indexed by heads.  The attention relates the input's last dimension to the inputs of the qkv weight and
the outputs of the projection and its bias, but it derives the head dimension from the input's width
(``C // num_heads``), so that width stays whole, and with it the residual stream of every Swin stage: what prunes
there is the MLPs' hidden width.
"""
from __future__ import annotations

import torch.fx
from fxcompress.passes.pruning.lib.channel_spaces import Relations

from fxcompress.fxutil import arg


def window_attention(r: Relations, node: torch.fx.Node, _=None) -> None:
    """``shifted_window_attention(input, qkv_weight, proj_weight, relative_position_bias, ..., qkv_bias=,
    proj_bias=, logit_scale=)``: (..., C) -> (..., C) through qkv (3C x C) and proj (C x C)."""
    x, qkv_w, proj_w = arg(node, 0, "input"), arg(node, 1, "qkv_weight"), arg(node, 2, "proj_weight")
    qkv_b, proj_b, scale = arg(node, 9, "qkv_bias"), arg(node, 10, "proj_bias"), arg(node, 11, "logit_scale")
    shape = r.shape(x)
    if shape is None or not all(isinstance(w, torch.fx.Node) for w in (qkv_w, proj_w)):
        return r.barrier(f"{r.where()}: window attention on a non-tensor")
    for d in range(len(shape) - 1):
        r.equal(r.sp(x, d), r.out(d))
    r.equal(r.sp(x, -1), r.sp(qkv_w, 1))
    r.equal(r.out(-1), r.sp(proj_w, 0))
    if isinstance(proj_b, torch.fx.Node):
        r.equal(r.out(-1), r.sp(proj_b, 0))
    why = f"{r.where()}: window attention derives its head dimension from the input's width (C // num_heads)"
    for space in (r.sp(x, -1), r.sp(qkv_w, 0), r.sp(proj_w, 1)):
        r.fixed(space, why)
    if isinstance(qkv_b, torch.fx.Node):
        r.equal(r.sp(qkv_b, 0), r.sp(qkv_w, 0))
    for value in (scale, arg(node, 3, "relative_position_bias")):
        if isinstance(value, torch.fx.Node):
            r.fix_all(value, why)


def channels_last_pad(r: Relations, node: torch.fx.Node, _=None) -> None:
    """``_patch_merging_pad(x)``: (..., H, W, C) padded to even H and W; every other dimension maps through."""
    x = node.args[0]
    shape = r.shape(x)
    if shape is None or len(shape) < 3:
        return r.barrier(f"{r.where()}: padding of a tensor with fewer than 3 dims")
    for d in range(len(shape)):
        if d not in (len(shape) - 3, len(shape) - 2):
            r.equal(r.sp(x, d), r.out(d))


def not_channels(r: Relations, node: torch.fx.Node, _=None) -> None:
    """An op over tensors that hold no channels (a relative position bias, indexed by heads): all stay whole."""
    why = f"{r.where()}: indexed by heads and positions, not channels"
    for value in [*node.all_input_nodes, node]:
        r.fix_all(value, why)


RULES = {"window_attention": window_attention, "channels_last_pad": channels_last_pad, "not_channels": not_channels}
