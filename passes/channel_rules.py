"""Channel rules: how each op relates the channel spaces of its inputs, outputs and parameters.

A *space* is one dimension of one value, keyed by names: ``(node_name, dim)`` for a node's tensor,
``("node_name.i", dim)`` for the i-th tensor of a structured output (``split``, ``nn.MultiheadAttention``),
``("@path.to.param", dim)`` for a parameter or buffer and ``("~name", 0)`` for a virtual factor (attention heads).

A rule receives a :class:`Relations` builder and states, as data:

- ``equal(a, b)``             a[i] is b[i] (same size),
- ``part(a, b, start)``       a[i] is b[start + i] (cat, split, chunk, slices),
- ``factors(m, [f1, ..])``    m's elements are the row-major product of the factors' (flatten into Linear,
                              channel shuffle, PixelShuffle, attention heads, depthwise multipliers),
- ``fixed(space, why)``       no element may be removed (model inputs/outputs, an op the rules do not know),
- ``inexact(space, why)``     removing elements changes the function beyond zeroing (LayerNorm, softmax, mean),
- ``grouped(space, g)``       removals must be spread equally over g contiguous blocks (grouped convs, GroupNorm),
- ``param(space, target, d, role)``   the space is dim ``d`` of parameter/buffer ``target``,
- ``hook(kind)``              the node must be rewritten after removal (reshape arguments, slice bounds, ...).

``RULES`` is keyed by objects: module classes, functions, and ``torch.Tensor`` methods (for ``call_method``).
An op missing from it is a barrier: every space it touches is fixed and the reason is recorded.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxcompress import meta

Space = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class Identity:
    def __str__(self) -> str:
        return "identity"


@dataclasses.dataclass(frozen=True)
class Offset:
    """The smaller space is the slice [start, start + n) of the larger one."""

    start: int
    n: int

    def __str__(self) -> str:
        return f"offset({self.start}, {self.n})"


@dataclasses.dataclass(frozen=True)
class Factor:
    """Element e of the merged space is element (e // stride) % size of the factor space."""

    stride: int
    size: int

    def __str__(self) -> str:
        return f"factor(stride={self.stride}, size={self.size})"


@dataclasses.dataclass(frozen=True)
class Grouped:
    """Removals spread equally over ``groups`` contiguous blocks of the space."""

    groups: int

    def __str__(self) -> str:
        return f"grouped({self.groups})"


@dataclasses.dataclass(frozen=True)
class ParamMember:
    target: str  # parameter or buffer path in the GraphModule
    dim: int
    role: str  # "out" (produces channels), "in" (consumes them), "norm" (per-channel scale/shift), "attr", "buffer"
    module: str  # owning module path ("" for bare parameters)


@dataclasses.dataclass(frozen=True)
class GroupedInput:
    """Input channels of a grouped (not depthwise) conv: weight[o, j] reads channel block(o) * (cin/g) + j."""

    module: str
    groups: int
    transposed: bool


class Relations:
    """Collects what the rules state about one graph (see the module docstring)."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.sizes: dict[Space, int] = {}
        self.edges: list[tuple[Space, Space, Any]] = []  # (a, b, Identity() | Offset) ; a is the part for Offset
        self.factor_edges: list[tuple[Space, Space, Factor]] = []  # (merged, factor, map)
        self.fixed_spaces: dict[Space, str] = {}
        self.inexact_spaces: dict[Space, str] = {}
        self.constraints: dict[Space, Grouped] = {}
        self.params: dict[Space, ParamMember] = {}
        self.grouped_inputs: dict[Space, GroupedInput] = {}
        self.hooks: dict[str, str] = {}  # node name -> rewrite kind
        self.barriers: dict[str, str] = {}  # node name -> why it is a barrier
        self.node: torch.fx.Node | None = None
        self.touched: set[Space] = set()  # spaces the current rule mentioned

    # -- spaces -------------------------------------------------------------------------------------------------
    def shape(self, value: Any) -> tuple[int, ...] | None:
        if isinstance(value, torch.fx.Node):
            info = meta.tensor_info(value)
            return info.shape if info is not None else None
        return None

    def space(self, owner: str, dim: int, size: int) -> Space:
        key = (owner, dim)
        self.sizes.setdefault(key, size)
        self.touched.add(key)
        return key

    def sp(self, value: torch.fx.Node, dim: int) -> Space:
        shape = self.shape(value)
        dim = dim % len(shape)
        return self.space(value.name, dim, shape[dim])

    def out(self, dim: int) -> Space:
        return self.sp(self.node, dim)

    def param_space(self, target: str, dim: int, role: str, module: str = "") -> Space:
        t = _lookup(self.gm, target)
        key = self.space("@" + target, dim, t.shape[dim])
        self.params.setdefault(key, ParamMember(target, dim, role, module))
        return key

    # -- relations ----------------------------------------------------------------------------------------------
    def equal(self, a: Space, b: Space) -> None:
        if self.sizes[a] != self.sizes[b]:
            self.fixed(a, f"{self.where()}: sizes {self.sizes[a]} and {self.sizes[b]} disagree")
            self.fixed(b, f"{self.where()}: sizes {self.sizes[a]} and {self.sizes[b]} disagree")
            return
        if a != b:
            self.edges.append((a, b, Identity()))

    def part(self, a: Space, b: Space, start: int) -> None:
        n = self.sizes[a]
        if start == 0 and n == self.sizes[b]:
            self.equal(a, b)
        else:
            self.edges.append((a, b, Offset(start, n)))

    def factors(self, merged: Space, factors: list[Space]) -> None:
        sizes = [self.sizes[f] for f in factors]
        stride = math.prod(sizes)
        assert stride == self.sizes[merged], (merged, factors)
        for f, size in zip(factors, sizes):
            stride //= size
            if size > 1:
                self.factor_edges.append((merged, f, Factor(stride, size)))

    def fixed(self, space: Space, why: str) -> None:
        self.fixed_spaces.setdefault(space, why)

    def inexact(self, space: Space, why: str) -> None:
        self.inexact_spaces.setdefault(space, why)

    def grouped(self, space: Space, groups: int) -> None:
        if groups > 1:
            self.constraints[space] = Grouped(groups)

    def hook(self, kind: str) -> None:
        self.hooks[self.node.name] = kind

    def where(self) -> str:
        return f"{self.node.op} {self.node.target if self.node.op != 'call_function' else _name(self.node.target)}" \
            f" ({self.node.name})"

    def barrier(self, why: str) -> None:
        """Fix every dimension of every tensor the node reads or produces."""
        self.barriers[self.node.name] = why
        for value in [*self.node.all_input_nodes, self.node]:
            self.fix_all(value, why)

    def fix_all(self, value: torch.fx.Node, why: str) -> None:
        info = value.meta.get(meta.TENSOR)
        if isinstance(info, meta.TensorInfo):
            for d in range(len(info.shape)):
                self.fixed(self.sp(value, d), why)
        elif isinstance(info, (tuple, list)):
            for i, item in enumerate(info):
                if isinstance(item, meta.TensorInfo):
                    for d in range(len(item.shape)):
                        self.fixed(self.space(f"{value.name}.{i}", d, item.shape[d]), why)


def _lookup(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _name(fn: Any) -> str:
    mod = getattr(fn, "__module__", None) or ""
    mod = {"_operator": "operator", "torch._C._nn": "F", "torch.nn.functional": "F",
           "torch._C._VariableFunctions": "torch"}.get(mod, mod)
    return f"{mod}.{getattr(fn, '__name__', repr(fn))}".lstrip(".")


def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _tensors(args) -> list[torch.fx.Node]:
    return [a for a in args if isinstance(a, torch.fx.Node) and isinstance(a.meta.get(meta.TENSOR), meta.TensorInfo)]


# ---- generic rules ----------------------------------------------------------------------------------------------

def unary(r: Relations, node: torch.fx.Node, _=None) -> None:
    """Elementwise on its first argument: every dimension maps to itself."""
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    if r.shape(x) is None or r.shape(x) != r.shape(node):
        return r.barrier(f"{r.where()}: not shape preserving")
    for d in range(len(r.shape(node))):
        r.equal(r.sp(x, d), r.out(d))


def broadcast(r: Relations, node: torch.fx.Node, _=None) -> None:
    """Elementwise over broadcast tensors (add, mul, where, SE scaling): equal sizes are the same elements."""
    out = r.shape(node)
    if out is None:
        return r.barrier(f"{r.where()}: output is not a tensor")
    for x in _tensors([*node.args, *node.kwargs.values()]):
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
    dim = module.dim if isinstance(module, nn.Module) else _arg(node, 1, "dim")
    if dim is not None and r.shape(node) is not None:
        r.inexact(r.out(dim), f"{r.where()} normalises over this dim")


def reduce(r: Relations, node: torch.fx.Node, _=None) -> None:
    """sum/mean/amax/...: kept dims map through; reducing over a channel dim is inexact unless it is a sum."""
    x = node.args[0]
    shape, out = r.shape(x), r.shape(node)
    dims = _arg(node, 1, "dim")
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if shape is None or out is None:
        return r.barrier(f"{r.where()}: unexpected shapes")
    if dims is None:
        dims = tuple(range(len(shape)))
    dims = {d % len(shape) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    k = 0
    for d in range(len(shape)):
        if d in dims:
            if name != "sum":
                r.inexact(r.sp(x, d), f"{r.where()} reduces over this dim")
            if keepdim:
                k += 1
            continue
        r.equal(r.sp(x, d), r.out(k))
        k += 1


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
        else:
            why = f"{r.where()} regroups several dims at once"
            for d in ia:
                r.fixed(r.sp(x, d), why)
            for d in ib:
                r.fixed(r.out(d), why)


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
        d0, d1 = _arg(node, 1, "dim0") % n, _arg(node, 2, "dim1") % n
        order = list(range(n))
        order[d0], order[d1] = order[d1], order[d0]
    elif name in ("t",):
        order = list(range(n))[::-1]
    else:
        dims = node.args[1:] if len(node.args) > 2 or isinstance(_arg(node, 1, "dims"), int) else _arg(node, 1, "dims")
        order = [d % n for d in dims]
    for k, d in enumerate(order):
        r.equal(r.sp(x, d), r.out(k))


def cat(r: Relations, node: torch.fx.Node, _=None) -> None:
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
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
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0) % len(r.shape(node))
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
    dim = _arg(node, 1 if unbind else 2, "dim", 0) % len(shape)
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


def getitem(r: Relations, node: torch.fx.Node, _=None) -> None:
    src, index = node.args
    info = src.meta.get(meta.TENSOR) if isinstance(src, torch.fx.Node) else None
    if isinstance(info, (tuple, list)):  # one tensor out of a structured value
        if isinstance(index, int) and isinstance(info[index], meta.TensorInfo):
            for d, size in enumerate(info[index].shape):
                r.equal(r.space(f"{src.name}.{index}", d, size), r.out(d))
        return
    if not isinstance(info, meta.TensorInfo):
        return  # indexing a shape or a list: no tensor space
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        k = index.index(Ellipsis)
        fill = len(info.shape) - (len(index) - 1 - sum(i is None for i in index))
        index = index[:k] + (slice(None),) * fill + index[k + 1:]
    d_in = d_out = 0
    touched = False
    for item in index:
        if item is None:
            d_out += 1
        elif isinstance(item, int):
            r.fixed(r.sp(src, d_in), f"{r.where()} selects entry {item} of this dim")
            d_in += 1
        elif isinstance(item, slice) and all(isinstance(v, (int, type(None))) for v in (item.start, item.stop)) \
                and item.step in (None, 1):
            start = item.start or 0
            start = start + info.shape[d_in] if start < 0 else min(start, info.shape[d_in])
            if r.shape(node)[d_out] != info.shape[d_in]:
                touched = True
            r.part(r.out(d_out), r.sp(src, d_in), start)
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


# ---- layers -----------------------------------------------------------------------------------------------------

def conv(r: Relations, node: torch.fx.Node, m: nn.modules.conv._ConvNd) -> None:
    x = node.args[0]
    shape, out = r.shape(x), r.shape(node)
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
    x, w = node.args[0], _arg(node, 1, "weight")
    b = _arg(node, 2, "bias")
    groups = _arg(node, 6, "groups", 1)
    transposed = "transpose" in node.target.__name__
    if transposed:
        groups = _arg(node, 6, "groups", 1)
    if groups != 1 or not isinstance(w, torch.fx.Node):
        return r.barrier(f"{r.where()}: functional conv with groups={groups}")
    w_out, w_in = (1, 0) if transposed else (0, 1)
    c = 1 if len(r.shape(x)) == len(r.shape(w)) else 0
    for d in range(c):
        r.equal(r.sp(x, d), r.out(d))
    r.equal(r.sp(x, c), r.sp(w, w_in))
    r.equal(r.out(c), r.sp(w, w_out))
    if isinstance(b, torch.fx.Node):
        r.equal(r.out(c), r.sp(b, 0))


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
    x, w, b = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")
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
    unary(r, node)
    for i, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        p = _arg(node, i, name)
        if isinstance(p, torch.fx.Node):
            r.equal(r.out(1), r.sp(p, 0))


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
    shape = _arg(node, 1, "normalized_shape")
    k = len(shape)
    n = len(r.shape(node))
    for j in range(k):
        r.inexact(r.out(n - k + j), f"{r.where()} normalises over this dim")
        for i, name in ((2, "weight"), (3, "bias")):
            p = _arg(node, i, name)
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
    shape, out = r.shape(x), r.shape(node)
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
    dim = _arg(node, 1, "dim", -1) % len(r.shape(x))
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
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return r.barrier(f"{t}: MultiheadAttention with kdim/vdim, bias_k or add_zero_attn")
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
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
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    r.equal(r.sp(q, -1), r.sp(k, -1))
    r.equal(r.sp(v, -1), r.out(-1))
    r.equal(r.sp(q, -2), r.out(-2))
    r.equal(r.sp(k, -2), r.sp(v, -2))
    so = r.shape(node)
    for x in (q, k, v):
        s = r.shape(x)
        for j in range(len(s) - 2):
            d = len(so) - len(s) + j
            if s[j] == so[d]:
                r.equal(r.sp(x, j), r.out(d))
    r.hook("sdpa")


def repeat(r: Relations, node: torch.fx.Node, _=None) -> None:
    """Tiling: output element e of a repeated dim is input element e % n."""
    x = node.args[0]
    reps = node.args[1:] if len(node.args) > 2 or isinstance(node.args[1], int) else node.args[1]
    shape, out = r.shape(x), r.shape(node)
    extra = len(out) - len(shape)
    for k, size in enumerate(shape):
        d = k + extra
        if reps[d] == 1:
            r.equal(r.sp(x, k), r.out(d))
        else:
            tile = r.space(f"~{node.name}.tile{d}", 0, reps[d])
            r.fixed(tile, f"{r.where()}: tile index")
            r.factors(r.out(d), [tile, r.sp(x, k)])


def recurrent(r: Relations, node: torch.fx.Node, m: nn.Module) -> None:
    r.barrier(f"{node.target} ({type(m).__name__}): recurrent layers are not pruned")


# ---- the table ------------------------------------------------------------------------------------------------

_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                  nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Dropout,
                  nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_UNARY_FUNCTIONS = (F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu,
                    F.elu, F.selu, F.mish, F.softplus, F.dropout, F.sigmoid, F.tanh, torch.relu, torch.sigmoid,
                    torch.tanh, torch.exp, torch.abs, torch.neg, torch.clamp, operator.neg, torch.nn.functional.relu_,
                    torch.square, torch.sqrt, torch.erf)
_UNARY_METHODS = ("relu", "relu_", "sigmoid", "tanh", "exp", "abs", "neg", "clamp", "clamp_", "contiguous",
                  "float", "half", "double", "to", "type_as", "clone", "detach", "sqrt", "square", "pow",
                  "sigmoid_")
_BINARY = (operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
           torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where, operator.pow,
           torch.pow)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
                 nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
_POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample)


def _pad(r: Relations, node: torch.fx.Node, _=None) -> None:
    pad = _arg(node, 1, "pad")
    leading(r, node, spatial=len(pad) // 2)


def _permute_method(r, node, _=None):
    permute(r, node)


RULES: dict[Any, Callable[..., None]] = {
    **{m: unary for m in _UNARY_MODULES},
    **{f: unary for f in _UNARY_FUNCTIONS},
    **{getattr(torch.Tensor, m): unary for m in _UNARY_METHODS},
    **{f: broadcast for f in _BINARY},
    **{getattr(torch.Tensor, m): broadcast for m in ("add", "sub", "mul", "div", "add_", "sub_",
                                                          "mul_", "div_", "masked_fill", "where")},
    **{m: leading for m in _POOL_MODULES},
    **{f: leading for f in _POOL_FUNCTIONS},
    F.pad: _pad,
    **{m: conv for m in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                         nn.ConvTranspose3d)},
    **{f: functional_conv for f in (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                                    F.conv_transpose3d)},
    nn.Linear: linear, F.linear: functional_linear,
    nn.modules.linear.NonDynamicallyQuantizableLinear: linear,
    **{f: matmul for f in (operator.matmul, torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm)},
    **{m: batchnorm for m in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)},
    F.batch_norm: functional_batchnorm,
    nn.LayerNorm: layernorm, F.layer_norm: functional_layernorm,
    nn.GroupNorm: groupnorm,
    nn.PReLU: prelu,
    nn.Embedding: embedding,
    nn.Softmax: softmax_like, nn.LogSoftmax: softmax_like, F.softmax: softmax_like, F.log_softmax: softmax_like,
    torch.softmax: softmax_like, torch.Tensor.softmax: softmax_like, torch.Tensor.log_softmax: softmax_like,
    **{f: reduce for f in (torch.mean, torch.sum, torch.amax, torch.amin, torch.Tensor.mean, torch.Tensor.sum,
                           torch.Tensor.amax, torch.Tensor.amin, torch.Tensor.std, torch.Tensor.var)},
    **{f: reshape for f in (torch.flatten, torch.reshape, torch.Tensor.flatten, torch.Tensor.view,
                            torch.Tensor.reshape, torch.Tensor.unflatten, torch.Tensor.squeeze,
                            torch.Tensor.unsqueeze, torch.squeeze, torch.unsqueeze, nn.Flatten, nn.Unflatten)},
    **{f: permute for f in (torch.permute, torch.transpose, torch.Tensor.permute, torch.Tensor.transpose,
                            torch.Tensor.t, torch.t, torch.swapaxes, torch.Tensor.swapaxes)},
    torch.cat: cat, torch.concat: cat, torch.stack: stack,
    **{f: split for f in (torch.split, torch.chunk, torch.unbind, torch.Tensor.split, torch.Tensor.chunk,
                          torch.Tensor.unbind)},
    operator.getitem: getitem,
    torch.narrow: narrow, torch.Tensor.narrow: narrow,
    torch.Tensor.size: no_tensor, getattr: no_tensor, torch.Tensor.dim: no_tensor,
    torch.Tensor.expand: expand, torch.Tensor.repeat: repeat, torch.Tensor.expand_as: expand,
    nn.PixelShuffle: pixel_shuffle, nn.PixelUnshuffle: pixel_shuffle, F.pixel_shuffle: pixel_shuffle,
    F.pixel_unshuffle: pixel_shuffle,
    F.glu: glu,
    nn.MultiheadAttention: multihead_attention,
    F.scaled_dot_product_attention: sdpa,
    **{m: recurrent for m in (nn.LSTM, nn.GRU, nn.RNN)},
}


def rule_for(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[Callable[..., None] | None, Any, str]:
    """(rule, module or None, readable op name) for a call node; rule None when the table has no entry."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        for cls in type(m).__mro__:
            if cls in RULES and cls is not nn.Module:
                return RULES[cls], m, f"{node.target} ({type(m).__name__})"
        return None, m, f"{node.target} ({type(m).__name__})"
    if node.op == "call_method":
        fn = getattr(torch.Tensor, node.target, None)
        return RULES.get(fn), None, f"Tensor.{node.target}"
    try:
        return RULES.get(node.target), None, _name(node.target)
    except TypeError:  # unhashable target
        return None, None, _name(node.target)
