"""Channel rules: how each op relates the channel spaces of its inputs, outputs and parameters.

A *space* is one dimension of one value, keyed by names: ``(node_name, dim)`` for a node's tensor,
``("node_name.i", dim)`` for the i-th tensor of a structured output (``split``, ``nn.MultiheadAttention``),
``("@path.to.param", dim)`` for a parameter or buffer and ``("~name", 0)`` for a virtual factor (attention heads).

The vocabulary (spaces, ``Relations``, index maps) is in ``channel_spaces``; the rules of layers with parameters
are in ``channel_layer_rules``.  Which op follows which rule is the ``channels`` field of its record in
``fxcompress/ops.py``; ``KINDS`` maps those names to the rules.  An op without one is a barrier: every space it
touches is fixed and the reason is recorded.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
from fxcompress.passes.pruning.lib.channel_layer_rules import (
    addmm,
    batchnorm,
    conv,
    embedding,
    functional_batchnorm,
    functional_conv,
    functional_groupnorm,
    functional_layernorm,
    functional_linear,
    glu,
    groupnorm,
    layernorm,
    linear,
    lp_normalize,
    matmul,
    multihead_attention,
    p_norm,
    pixel_shuffle,
    prelu,
    recurrent,
    repeat,
    sdpa,
)
from fxcompress.passes.pruning.lib.channel_library_rules import RULES as LIBRARY_RULES
from fxcompress.passes.pruning.lib.channel_spaces import (
    Factor,
    GroupedInput,
    Identity,
    Offset,
    ParamMember,
    Relations,
    Space,
    common_pieces,
    index_items,
    op_name,
    reduce_over,
    slice_start,
    tensor_args,
    through_pieces,
    unary,
)

from fxcompress import meta, ops
from fxcompress.fxutil import arg, lookup
from fxcompress.tree import named_tensors

__all__ = ["KINDS", "rule_for", "Relations", "Space", "Identity", "Offset", "Factor", "ParamMember", "GroupedInput"]


# ---- generic rules ----------------------------------------------------------------------------------------------

def broadcast(r: Relations, node: torch.fx.Node, _=None) -> None:
    """Elementwise over broadcast tensors (add, mul, where, SE scaling): equal sizes are the same elements."""
    out = r.shape(node)
    if out is None:
        return r.barrier(f"{r.where()}: output is not a tensor")
    for x in tensor_args([*node.args, *node.kwargs.values()]):
        shape = r.shape(x)
        if len(shape) > len(out):
            return r.barrier(f"{r.where()}: unexpected broadcast")
        for k, size in enumerate(shape):
            d = len(out) - len(shape) + k
            if size == out[d]:
                r.equal(r.sp(x, k), r.out(d))


def leading(r: Relations, node: torch.fx.Node, _=None, spatial: int | None = None) -> None:
    """Pooling, interpolation, padding: the batch and channel dims map through, spatial dims do not."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    shape, out = r.shape(x), r.shape(node)
    if shape is None or out is None or len(shape) != len(out) or len(shape) < 2:
        return r.barrier(f"{r.where()}: unexpected shapes")
    keep = len(shape) - (spatial if spatial is not None else len(shape) - 2)
    for d in range(keep):
        if shape[d] != out[d]:
            return r.barrier(f"{r.where()}: changes dim {d}")
        r.equal(r.sp(x, d), r.out(d))


def softmax_like(r: Relations, node: torch.fx.Node, module: Any = None) -> None:
    unary(r, node)
    dim = module.dim if isinstance(module, nn.Module) else arg(node, 1, "dim")
    if dim is not None and r.shape(node) is not None:
        r.inexact(r.out(dim), f"{r.where()} normalises over this dim")


def reduce(r: Relations, node: torch.fx.Node, _=None) -> None:
    """sum/mean/amax/...: kept dims map through; reducing over a channel dim is inexact unless it is a sum."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    reduce_over(r, node, arg(node, 1, "dim"), exact=name == "sum")


def reshape(r: Relations, node: torch.fx.Node, _=None) -> None:
    """view/reshape/flatten/unflatten/squeeze: blocks of dims whose sizes multiply to the same number."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    a, b = r.shape(x), r.shape(node)
    if a is None or b is None or math.prod(a) != math.prod(b):
        return r.barrier(f"{r.where()}: unexpected shapes")
    if isinstance(node.target, str) and node.target in ("view", "reshape") or node.target is torch.reshape:
        r.hook("reshape")
    elif node.target == "unflatten":
        r.hook("unflatten")
    for (ia, ib) in _blocks(a, b):
        big_a = [d for d in ia if a[d] > 1]
        big_b = [d for d in ib if b[d] > 1]
        if not big_a and not big_b:
            for da, db in zip(ia, ib):
                r.equal(r.sp(x, da), r.out(db))
        elif len(big_a) == 1 and len(big_b) == 1:
            r.equal(r.sp(x, big_a[0]), r.out(big_b[0]))
        elif len(big_a) == 1:
            r.factors(r.sp(x, big_a[0]), [r.out(d) for d in big_b])
        elif len(big_b) == 1:
            r.factors(r.out(big_b[0]), [r.sp(x, d) for d in big_a])
        elif (pieces := common_pieces([a[d] for d in big_a], [b[d] for d in big_b])) is not None:
            through_pieces(r, node, [r.sp(x, d) for d in big_a] + [r.out(d) for d in big_b], pieces)
        else:
            why = f"{r.where()} regroups several dims at once"
            for d in ia:
                r.fixed(r.sp(x, d), why)
            for d in ib:
                r.fixed(r.out(d), why)


def reshape_as(r: Relations, node: torch.fx.Node, _=None) -> None:
    """``x.reshape_as(y)`` / ``x.view_as(y)``: a reshape whose result has ``y``'s dims (no sizes to rewrite)."""
    reshape(r, node)
    other = node.args[1]
    if r.shape(other) == r.shape(node):
        for d in range(len(r.shape(node))):
            r.equal(r.out(d), r.sp(other, d))


def _blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Split two shapes with equal products into aligned blocks of dims with equal products."""
    blocks, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        ia, ib = [], []
        pa = pb = 1
        while True:
            if i < len(a) and (pa < pb or not ia or (pa == pb and not ib and a[i] == 1)):
                pa *= a[i]
                ia.append(i)
                i += 1
            elif j < len(b) and (pb < pa or not ib):
                pb *= b[j]
                ib.append(j)
                j += 1
            else:
                break
            if pa == pb and ia and ib:
                while i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
                    ia.append(i)
                    i += 1
                while j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
                    ib.append(j)
                    j += 1
                break
        if pa != pb:
            blocks.append((ia + list(range(i, len(a))), ib + list(range(j, len(b)))))
            break
        blocks.append((ia, ib))
    return blocks


def permute(r: Relations, node: torch.fx.Node, _=None) -> None:
    x = node.args[0]
    shape = r.shape(x)
    n = len(shape)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = arg(node, 1, "dim0") % n, arg(node, 2, "dim1") % n
        order = list(range(n))
        order[d0], order[d1] = order[d1], order[d0]
    elif name in ("t",):
        order = list(range(n))[::-1]
    else:
        dims = node.args[1:] if len(node.args) > 2 or isinstance(arg(node, 1, "dims"), int) else arg(node, 1, "dims")
        order = [d % n for d in dims]
    for k, d in enumerate(order):
        r.equal(r.sp(x, d), r.out(k))


def cat(r: Relations, node: torch.fx.Node, _=None) -> None:
    tensors = arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0)
    out = r.shape(node)
    dim %= len(out)
    start = 0
    for x in tensors:
        shape = r.shape(x)
        if shape is None:
            return r.barrier(f"{r.where()}: concatenates a non-tensor")
        for d in range(len(out)):
            if d == dim:
                r.part(r.sp(x, d), r.out(d), start)
            else:
                r.equal(r.sp(x, d), r.out(d))
        start += shape[dim]


def stack(r: Relations, node: torch.fx.Node, _=None) -> None:
    tensors = arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0) % len(r.shape(node))
    for x in tensors:
        for d in range(len(r.shape(x))):
            r.equal(r.sp(x, d), r.out(d if d < dim else d + 1))
    r.fixed(r.out(dim), f"{r.where()}: stacked dim")


def split(r: Relations, node: torch.fx.Node, _=None) -> None:
    """split/chunk/tensor_split/unbind: each output tensor is a part of the input along ``dim``."""
    x = node.args[0]
    shape = r.shape(x)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    outs = node.meta.get(meta.TENSOR)
    if shape is None or not isinstance(outs, (tuple, list)):
        return r.barrier(f"{r.where()}: unexpected shapes")
    unbind = name == "unbind"
    dim = arg(node, 1 if unbind else 2, "dim", 0) % len(shape)
    if not unbind:
        r.hook("split")
    start = 0
    for i, info in enumerate(outs):
        owner = f"{node.name}.{i}"
        for d in range(len(shape)):
            if unbind:
                if d != dim:
                    od = d if d < dim else d - 1
                    r.equal(r.sp(x, d), r.space(owner, od, info.shape[od]))
            elif d == dim:
                r.part(r.space(owner, d, info.shape[d]), r.sp(x, d), start)
            else:
                r.equal(r.space(owner, d, info.shape[d]), r.sp(x, d))
        start += 1 if unbind else info.shape[dim]
    if unbind:
        r.fixed(r.sp(x, dim), f"{r.where()} selects single entries of this dim")


def _is_index_tensor(item: Any) -> bool:
    info = meta.tensor_info(item) if isinstance(item, torch.fx.Node) else None
    return info is not None and not info.dtype.is_floating_point and info.dtype != torch.bool


def _gather(r: Relations, node: torch.fx.Node, src: torch.fx.Node, info: meta.TensorInfo, k: int,
            index: torch.fx.Node) -> None:
    """``table[..., index, ...]`` with one integer tensor at dim ``k`` (full slices elsewhere): entries picked by
    position (a relative position bias table, an embedding): dim ``k`` and the index's dims are positions, not
    channels; the other dims map through around the index's dims."""
    why = f"{r.where()}: entries picked by an index tensor (positions, not channels)"
    n_idx = len(meta.tensor_info(index).shape)
    r.not_channels(index, why)
    for space in (r.sp(src, k), *(r.out(k + j) for j in range(n_idx))):
        r.position(space, why)
    for d in range(len(info.shape)):
        if d != k:
            r.equal(r.sp(src, d), r.out(d if d < k else d + n_idx - 1))


def getitem(r: Relations, node: torch.fx.Node, _=None) -> None:
    src, index = node.args
    info = src.meta.get(meta.TENSOR) if isinstance(src, torch.fx.Node) else None
    if isinstance(info, (tuple, list)):  # one tensor out of a structured value
        if isinstance(index, int) and -len(info) <= index < len(info) and isinstance(info[index], meta.TensorInfo):
            index %= len(info)  # chunk[-1] is the space of chunk's last output, named by its position
            for d, size in enumerate(info[index].shape):
                r.equal(r.space(f"{src.name}.{index}", d, size), r.out(d))
        return
    if not isinstance(info, meta.TensorInfo):
        return  # indexing a shape or a list: no tensor space
    items = index_items(index, len(info.shape))
    tensors = [k for k, item in enumerate(items) if isinstance(item, torch.fx.Node)]
    if len(tensors) == 1 and _is_index_tensor(items[tensors[0]]) and all(
            k in tensors or item == slice(None) for k, item in enumerate(items)):
        return _gather(r, node, src, info, tensors[0], items[tensors[0]])
    d_in = d_out = 0
    touched = False
    for item in items:
        if item is None:
            d_out += 1
        elif isinstance(item, int):
            r.fixed(r.sp(src, d_in), f"{r.where()} selects entry {item} of this dim")
            d_in += 1
        elif isinstance(item, slice) and all(isinstance(v, (int, type(None))) for v in (item.start, item.stop)) \
                and item.step in (None, 1):
            start = slice_start(item, info.shape[d_in])
            if r.shape(node)[d_out] != info.shape[d_in]:
                touched = True
            r.part(r.out(d_out), r.sp(src, d_in), start)
            d_in += 1
            d_out += 1
        elif isinstance(item, slice) and all(isinstance(v, (int, type(None))) for v in (item.start, item.stop)) \
                and isinstance(item.step, int) and item.step > 1:  # every k-th entry (LeViT's token subsampling)
            why = f"{r.where()} takes every {item.step}-th entry of this dim"
            r.fixed(r.sp(src, d_in), why)
            r.fixed(r.out(d_out), why)
            touched = True
            d_in += 1
            d_out += 1
        elif isinstance(item, slice) and item.step in (None, 1):  # a traced bound (Swin's x[:, :H, :W] after padding)
            why = f"{r.where()} slices this dim at a traced bound"
            r.fixed(r.sp(src, d_in), why)
            r.fixed(r.out(d_out), why)
            d_in += 1
            d_out += 1
        else:
            return r.barrier(f"{r.where()}: index {item!r} is not a constant slice")
    for d in range(d_in, len(info.shape)):
        r.equal(r.sp(src, d), r.out(d_out + d - d_in))
    if touched:
        r.hook("slice")


def narrow(r: Relations, node: torch.fx.Node, _=None) -> None:
    x, dim, start = node.args[0], node.args[1], node.args[2]
    shape = r.shape(x)
    dim %= len(shape)
    for d in range(len(shape)):
        if d == dim:
            r.part(r.out(d), r.sp(x, d), start % shape[d])
        else:
            r.equal(r.sp(x, d), r.out(d))
    r.hook("narrow")


def no_tensor(r: Relations, node: torch.fx.Node, _=None) -> None:
    """size, dim, getattr(x, 'shape'): reads shapes only; sizes of pruned dims are frozen by the rewrite."""
    x = node.args[0]
    if r.shape(x) is not None:
        for d in range(len(r.shape(x))):
            r.sp(x, d)  # read, not related: the sizes are frozen when channels are removed
    if node.target in ("size",) or node.target is getattr:
        r.hook("size")


def expand(r: Relations, node: torch.fx.Node, _=None) -> None:
    x = node.args[0]
    a, b = r.shape(x), r.shape(node)
    for k, size in enumerate(a):
        d = len(b) - len(a) + k
        if size == b[d]:
            r.equal(r.sp(x, k), r.out(d))
    if node.target == "expand_as":
        broadcast(r, node)
    else:  # its sizes name the pruned widths (GQA's repeat_kv: x.expand(b, kv_heads, rep, t, head_dim)): rewritten
        r.hook("reshape")


def select(r: Relations, node: torch.fx.Node, _=None) -> None:
    """``x.select(dim, index)`` (``x[:, 0]`` as torch.export records it): the other dims map through; the selected
    dim stays whole (its index names one of its elements)."""
    x, dim = node.args[0], arg(node, 1, "dim")
    shape = r.shape(x)
    if shape is None or not isinstance(dim, int):
        return r.barrier(f"{r.where()}: select along a dim that is not a constant")
    dim %= len(shape)
    for d in range(len(shape)):
        if d != dim:
            r.equal(r.sp(x, d), r.out(d - (d > dim)))
    r.fixed(r.sp(x, dim), f"{r.where()}: an element selected by index")


def einsum_subscripts(node: torch.fx.Node) -> tuple[list[tuple[Any, list[str]]], list[str]] | None:
    """((operand, its letters), output letters) of ``torch.einsum(equation, *operands)``, an ellipsis spelled as
    numbered letters aligned from the right; None when the equation is not a constant or the shapes are unknown."""
    eq, operands = node.args[0], list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(eq, str) or not all(isinstance(o, torch.fx.Node) for o in operands):
        return None
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    inputs = lhs.split(",")
    if len(inputs) != len(operands):
        return None
    shapes = [meta.tensor_info(o).shape if isinstance(meta.tensor_info(o), meta.TensorInfo) else None for o in operands]
    if any(s is None for s in shapes):
        return None
    ellipsis = max((len(s) - len(sub.replace("...", "")) for s, sub in zip(shapes, inputs) if "..." in sub), default=0)
    ell = [f"#{i}" for i in range(ellipsis)]

    def letters(sub: str, rank: int | None) -> list[str]:
        head, dots, tail = sub.partition("...")
        middle = ell[ellipsis - (rank - len(head) - len(tail)):] if dots and rank is not None else (ell if dots else [])
        return [*head, *middle, *tail]
    ops = [(o, letters(sub, len(s))) for o, sub, s in zip(operands, inputs, shapes)]
    if not arrow:  # implicit output: the letters seen once, in alphabetical order, after the ellipsis
        counts = collections.Counter(c for sub in inputs for c in sub.replace("...", ""))
        rhs = ("..." if ellipsis else "") + "".join(sorted(c for c, n in counts.items() if n == 1))
    return ops, letters(rhs, None)


def einsum(r: Relations, node: torch.fx.Node, _=None) -> None:
    """``torch.einsum``: every occurrence of a subscript letter is one space (in the output, or contracted between
    operands, as in a matmul); a letter of size 1 broadcasts and stays apart."""
    parsed = einsum_subscripts(node)
    if parsed is None:
        return r.barrier(f"{r.where()}: einsum with an equation or operands that are not known")
    ops, out = parsed
    first: dict[str, Any] = {}
    for d, c in enumerate(out):
        first[c] = r.out(d)
    for operand, subs in ops:
        for d, c in enumerate(subs):
            space = r.sp(operand, d)
            if r.shape(operand)[d] == 1 and c in first and r.sizes[first[c]] != 1:
                continue  # broadcast
            if c in first:
                r.equal(first[c], space)
            else:
                first[c] = space


# ---- the table ------------------------------------------------------------------------------------------------

def _pad(r: Relations, node: torch.fx.Node, _=None) -> None:
    """Padding: a dim padded by nothing maps through (Swin pads H and W by traced amounts and the channels by 0);
    the padded dims are positions."""
    x, pad = node.args[0], arg(node, 1, "pad")
    shape, out = r.shape(x), r.shape(node)
    if not isinstance(pad, (tuple, list)):
        return r.barrier(f"{r.where()}: the padding is one traced value, not a list of amounts")
    if shape is None or out is None or len(shape) != len(out) or len(pad) % 2 or len(pad) // 2 > len(shape):
        return r.barrier(f"{r.where()}: unexpected shapes")
    for d in range(len(shape)):
        k = len(shape) - 1 - d  # pad[2k], pad[2k + 1] pad dim d
        if 2 * k >= len(pad) or all(isinstance(p, int) and p == 0 for p in pad[2 * k:2 * k + 2]):
            if shape[d] != out[d]:
                return r.barrier(f"{r.where()}: changes dim {d}")
            r.equal(r.sp(x, d), r.out(d))


def roll(r: Relations, node: torch.fx.Node, _=None) -> None:
    """``torch.roll`` along some dims (Swin's shifted windows): the rolled dims are positions, the others map
    through."""
    x, dims = node.args[0], arg(node, 2, "dims")
    shape = r.shape(x)
    if dims is None or shape is None:
        return r.barrier(f"{r.where()}: rolls the flattened tensor")
    rolled = {d % len(shape) for d in ((dims,) if isinstance(dims, int) else dims)}
    for d in range(len(shape)):
        if d not in rolled:
            r.equal(r.sp(x, d), r.out(d))


KINDS: dict[str, Callable[..., None]] = {
    "unary": unary, "broadcast": broadcast, "leading": leading, "pad": _pad, "softmax_like": softmax_like,
    "reduce": reduce, "reshape": reshape, "permute": permute, "cat": cat, "stack": stack, "split": split,
    "getitem": getitem, "narrow": narrow, "no_tensor": no_tensor, "expand": expand, "repeat": repeat,
    "conv": conv, "functional_conv": functional_conv, "linear": linear, "functional_linear": functional_linear,
    "matmul": matmul, "addmm": addmm, "batchnorm": batchnorm, "functional_batchnorm": functional_batchnorm,
    "layernorm": layernorm, "functional_layernorm": functional_layernorm, "groupnorm": groupnorm,
    "functional_groupnorm": functional_groupnorm, "prelu": prelu, "lp_normalize": lp_normalize,
    "p_norm": p_norm,
    "embedding": embedding, "pixel_shuffle": pixel_shuffle, "glu": glu, "multihead_attention": multihead_attention,
    "sdpa": sdpa, "recurrent": recurrent, "einsum": einsum, "select": select, "reshape_as": reshape_as, "roll": roll,
    **LIBRARY_RULES,
}
"""The channel rule of each ``channels`` kind that ``fxcompress/ops.py`` records name."""


def rule_for(gm: torch.fx.GraphModule, node: torch.fx.Node,
             modules: dict[str, nn.Module] | None = None) -> tuple[Callable[..., None] | None, Any, str]:
    """(rule, module or None, readable op name) for a call node; rule None when the op has no channel rule."""
    kind = ops.of_node(gm, node, "channels", modules)
    rule = KINDS[kind] if kind is not None else None
    if node.op == "call_module":
        m = modules[node.target] if modules is not None else gm.get_submodule(node.target)
        return rule, m, f"{node.target} ({type(m).__name__})"
    if node.op == "call_method":
        return rule, None, f"Tensor.{node.target}"
    return rule, None, op_name(node.target)


def build_relations(gm: torch.fx.GraphModule) -> Relations:
    """Run every node's rule; ops without a rule, and rules that fail, become barriers."""
    r = Relations(gm)
    for node in gm.graph.nodes:
        r.node = node
        if node.op == "placeholder":
            r.fix_all(node, f"model input {node.name!r}")
        elif node.op == "output":
            for x in node.all_input_nodes:
                r.fix_all(x, "model output")
        elif node.op == "get_attr":
            info = meta.tensor_info(node)
            if info is not None:
                t = lookup(gm, node.target)
                role = "attr" if isinstance(t, torch.nn.Parameter) else "buffer"
                for d in range(len(info.shape)):
                    r.equal(r.out(d), r.param_space(node.target, d, role))
        else:
            tensors_in = [x for x in node.all_input_nodes if _has_tensor(x)]
            if not tensors_in and not _has_tensor(node):
                continue  # arithmetic on sizes and other Python values
            rule, module, what = rule_for(gm, node)
            if rule is None:
                r.barrier(f"{what} is not in the channel rules")
                continue
            r.touched = set()
            try:
                rule(r, node, module)
            except Exception as exc:  # noqa: BLE001 - an op the rule cannot read is a barrier, never a crash
                r.barrier(f"{what}: its rule could not read this call ({type(exc).__name__}: {exc})")
                continue
            _fix_untouched(r, [x for x in tensors_in if meta.tensor_info(x) is not None] + [node], what)
    _tie_aliases(r, gm)
    return r


def _tie_aliases(r: Relations, gm: torch.fx.GraphModule) -> None:
    """A tensor held under several names (an embedding tied to the output layer) is one tensor: each of its dims is
    one channel space under every name, so that pruning removes the same channels at all of its uses."""
    names: dict[int, list[str]] = {}
    dims: dict[int, int] = {}
    for name, t in named_tensors(gm):
        names.setdefault(id(t), []).append(name)
        dims[id(t)] = t.dim()
    r.node = None
    for key, group in names.items():
        if len(group) < 2:  # one name: nothing to tie
            continue
        for d in range(dims[key]):
            spaces = [("@" + n, d) for n in group if ("@" + n, d) in r.sizes]
            for a, b in zip(spaces, spaces[1:]):
                r.equal(a, b)


def _has_tensor(node: torch.fx.Node) -> bool:
    return any(True for _ in meta.iter_tensor_infos(node.meta.get(meta.TENSOR)))


def _fix_untouched(r: Relations, values: list[torch.fx.Node], what: str) -> None:
    """Dims a rule used without relating them (a conv's kernel dims, spatial dims) are fixed."""
    for value in values:
        info = value.meta.get(meta.TENSOR)
        items = [(value.name, info)] if isinstance(info, meta.TensorInfo) else \
            [(f"{value.name}.{i}", t) for i, t in enumerate(info)] if isinstance(info, (tuple, list)) else []
        for owner, t in items:
            if not isinstance(t, meta.TensorInfo):
                continue
            for d, size in enumerate(t.shape):
                if (owner, d) not in r.touched and size > 1:
                    r.fixed(r.space(owner, d, size), f"{what} uses dim {d} of {owner} without relating it")
