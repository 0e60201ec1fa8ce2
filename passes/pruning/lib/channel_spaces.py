"""Channel spaces and the relations rules state between them (the vocabulary of ``channel_rules``).

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

"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import operator
from typing import Any

import torch
import torch.fx

from fxcompress import meta
from fxcompress.fxutil import lookup

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
        self.positional: set[Space] = set()  # dims that are no channels: positions (bias tables), group counts

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
        t = lookup(self.gm, target)
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
        return f"{self.node.op} {self.node.target if self.node.op != 'call_function' else op_name(self.node.target)}" \
            f" ({self.node.name})"

    def barrier(self, why: str) -> None:
        """Fix every dimension of every tensor the node reads or produces."""
        self.barriers[self.node.name] = why
        for value in [*self.node.all_input_nodes, self.node]:
            self.fix_all(value, why)

    def position(self, space: Space, why: str) -> None:
        """``space`` stays whole and is no channel dim (positions of a bias table, a count of conv groups): its
        group does not count among the model's channels."""
        self.fixed(space, why)
        self.positional.add(space)

    def not_channels(self, value: torch.fx.Node, why: str) -> None:
        """Every dim of ``value`` is a ``position`` (a relative position bias table: positions and heads)."""
        for space in self._spaces(value):
            self.position(space, why)

    def fix_all(self, value: torch.fx.Node, why: str) -> None:
        for space in self._spaces(value):
            self.fixed(space, why)

    def _spaces(self, value: torch.fx.Node) -> list[Space]:
        """Every dim of ``value``'s tensor, or of each tensor of a structured value."""
        info = value.meta.get(meta.TENSOR)
        if isinstance(info, meta.TensorInfo):
            return [self.sp(value, d) for d in range(len(info.shape))]
        if isinstance(info, (tuple, list)):
            return [self.space(f"{value.name}.{i}", d, item.shape[d]) for i, item in enumerate(info)
                    if isinstance(item, meta.TensorInfo) for d in range(len(item.shape))]
        return []


def op_name(fn: Any) -> str:
    mod = getattr(fn, "__module__", None) or ""
    mod = {"_operator": "operator", "torch._C._nn": "F", "torch.nn.functional": "F",
           "torch._C._VariableFunctions": "torch"}.get(mod, mod)
    return f"{mod}.{getattr(fn, '__name__', repr(fn))}".lstrip(".")


def tensor_args(args) -> list[torch.fx.Node]:
    return [a for a in args if isinstance(a, torch.fx.Node) and isinstance(a.meta.get(meta.TENSOR), meta.TensorInfo)]


def unary(r: Relations, node: torch.fx.Node, _=None) -> None:
    """Elementwise on its first argument: every dimension maps to itself."""
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    if r.shape(x) is None or r.shape(x) != r.shape(node):
        return r.barrier(f"{r.where()}: not shape preserving")
    for d in range(len(r.shape(node))):
        r.equal(r.sp(x, d), r.out(d))


def reduce_over(r: Relations, node: torch.fx.Node, dims: Any, exact: bool) -> None:
    """A reduction of ``node.args[0]`` over ``dims`` (None: all; keepdim read from the shapes, as torch.var's third
    argument is ``unbiased``): kept dims map through; reducing over a channel dim is inexact unless ``exact`` (a
    sum or a p-norm, to which a zeroed channel adds nothing)."""
    x = node.args[0]
    shape, out = r.shape(x), r.shape(node)
    if shape is None or out is None:
        return r.barrier(f"{r.where()}: unexpected shapes")
    keepdim = len(out) == len(shape)
    if dims is None:
        dims = tuple(range(len(shape)))
    dims = {d % len(shape) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    k = 0
    for d in range(len(shape)):
        if d in dims:
            if not exact:
                r.inexact(r.sp(x, d), f"{r.where()} reduces over this dim")
            if keepdim:
                k += 1
            continue
        r.equal(r.sp(x, d), r.out(k))
        k += 1


def index_items(index: Any, rank: int) -> list:
    """A getitem index as a list with one entry per indexed dim (``...`` expanded; ``None`` entries kept)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in items):
        k = items.index(Ellipsis)
        fill = rank - (len(items) - 1 - sum(i is None for i in items))
        items = items[:k] + [slice(None)] * fill + items[k + 1:]
    return items


def slice_start(item: slice, size: int) -> int:
    """Where a constant slice starts along a dim of ``size`` (negative starts counted from the end)."""
    start = item.start or 0
    return start + size if start < 0 else min(start, size)


def common_pieces(sa: list[int], sb: list[int]) -> list[tuple[int, list[int]]] | None:
    """The coarsest sizes both shapes are row-major products of, as (size, the dims of ``sa + sb`` each piece
    lies in): (C, H) -> (C * n, H / n) is C | n | H / n (MobileViT's unfolding into patches).  None when the dims
    interleave (6 x 4 -> 4 x 6)."""
    ends = sorted(set(itertools.accumulate(sa, operator.mul)) | set(itertools.accumulate(sb, operator.mul)))
    if any(hi % lo for lo, hi in zip(ends, ends[1:])):
        return None
    starts = [1, *ends[:-1]]
    owner: dict[int, list[int]] = collections.defaultdict(list)
    for offset, sizes in ((0, sa), (len(sa), sb)):
        lo = 1
        for k, size in enumerate(sizes):  # dim k spans the prefix products (lo, lo * size]
            for j, (start, end) in enumerate(zip(starts, ends)):
                if lo <= start and end <= lo * size:
                    owner[j].append(offset + k)
            lo *= size
    return [(hi // lo, owner[j]) for j, (lo, hi) in enumerate(zip(starts, ends))]


def through_pieces(r: Relations, node: torch.fx.Node, dims: list[Space], pieces) -> None:
    """Each dim of a reshape is its piece, or the row-major product of its pieces (virtual spaces)."""
    spaces = [r.space(f"~{node.name}.piece{j}", 0, size) for j, (size, _) in enumerate(pieces)]
    for k, dim in enumerate(dims):
        mine = [spaces[j] for j, (_, owners) in enumerate(pieces) if k in owners]
        if len(mine) == 1:
            r.equal(dim, mine[0])
        else:
            r.factors(dim, mine)
