"""Params, MACs and bytes per node, from graph metadata.

MACs count multiply-accumulates of the layers that dominate compute: convolutions (also transposed and grouped),
linear layers, matrix products (matmul/mm/bmm/addmm/baddbmm) and attention (``nn.MultiheadAttention``,
``F.scaled_dot_product_attention``), whether called as modules or functions.  Elementwise ops, norms and pooling
count 0, as in the published MAC counts of ResNet/MobileNet.  Which op counts how is the ``macs`` field of its
record in ``ops.py``; ``MAC_RULES`` implements each kind.  A shared module's parameters are counted once in totals
but its MACs at every call.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.nn as nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from . import meta, ops
from .fxutil import arg
from .meta import TensorInfo
from .tree import named_modules


@dataclasses.dataclass(frozen=True)
class NodeCost:
    node: str
    op: str
    target: str
    shape: str
    params: int
    macs: int
    weight_bytes: int  # parameters and buffers this node reads
    out_bytes: int  # bytes of the tensors it produces


@dataclasses.dataclass(frozen=True)
class Totals:
    params: int
    macs: int
    weight_bytes: int  # parameters + buffers, each counted once: the model's size in memory
    nodes: int


def add(totals_: Iterable[Totals]) -> Totals:
    """The sum of several modules' totals (the pieces of a model compiled piece by piece)."""
    parts = list(totals_)
    return Totals(*(sum(getattr(t, f.name) for t in parts) for f in dataclasses.fields(Totals)))


def _info(arg: Any) -> TensorInfo | None:
    return meta.tensor_info(arg) if isinstance(arg, torch.fx.Node) else None


def _prod(xs: Iterable[int]) -> int:
    return math.prod(int(x) for x in xs)


def _out_times_k(a_index: int, a_name: str) -> Callable[[torch.fx.Node, Any], int]:
    """MACs of a product whose output has numel elements each reducing over k = a.shape[-1]."""

    def rule(node: torch.fx.Node, _=None) -> int:
        a, out = _info(arg(node, a_index, a_name)), meta.tensor_info(node)
        return out.numel * a.shape[-1] if a is not None and out is not None and a.shape else 0

    return rule


def _conv_fn(transposed: bool) -> Callable[[torch.fx.Node, Any], int]:
    def rule(node: torch.fx.Node, _=None) -> int:
        x, w, out = _info(arg(node, 0, "input")), _info(arg(node, 1, "weight")), meta.tensor_info(node)
        if x is None or w is None or out is None:
            return 0
        per_out = w.shape[1] * _prod(w.shape[2:])
        return x.numel * per_out if transposed else out.numel * per_out

    return rule


def _sdpa(node: torch.fx.Node, _=None) -> int:
    q, k, v = (_info(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    if q is None or k is None or v is None:
        return 0
    batch = _prod(q.shape[:-2])
    return batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _linear_module(node: torch.fx.Node, m: nn.Linear) -> int:
    out = meta.tensor_info(node)
    return out.numel * m.in_features if out is not None else 0


def _conv_module(node: torch.fx.Node, m: _ConvNd) -> int:
    x, out = _info(arg(node, 0, "input")), meta.tensor_info(node)
    if x is None or out is None:
        return 0
    if isinstance(m, _ConvTransposeNd):
        return x.numel * (m.out_channels // m.groups) * _prod(m.kernel_size)
    return out.numel * (m.in_channels // m.groups) * _prod(m.kernel_size)


def _codebook_module(node: torch.fx.Node, m: nn.Module) -> int:
    out = meta.tensor_info(node)
    return out.numel * _prod(m.weight_shape[1:]) if out is not None else 0


def _mha_module(node: torch.fx.Node, m: nn.MultiheadAttention) -> int:
    q, k, v = (_info(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    if q is None or k is None or v is None:
        return 0
    seq = 1 if m.batch_first and len(q.shape) == 3 else 0  # index of the sequence axis
    L, S, E = q.shape[seq], k.shape[seq], m.embed_dim
    batch = q.numel // (L * q.shape[-1])
    projections = L * E * E + S * k.shape[-1] * E + S * v.shape[-1] * E + L * E * E
    return batch * (projections + 2 * L * S * E)


def _window_attention(node: torch.fx.Node, _=None) -> int:
    """torchvision's ``shifted_window_attention`` (and ``fxcompress.modules.window_attention``): qkv and output
    projections of every token, and the attention products within windows of ``window_size`` tokens (2 x tokens x
    window x heads x head_dim; padding to whole windows ignored)."""
    x, qkv, proj = (_info(arg(node, i, n)) for i, n in enumerate(("input", "qkv_weight", "proj_weight")))
    window = arg(node, 4, "window_size")
    if x is None or qkv is None or proj is None or not isinstance(window, (list, tuple)):
        return 0
    tokens = _prod(x.shape[:-1])
    return tokens * (_prod(qkv.shape) + _prod(proj.shape) + 2 * _prod(window) * (qkv.shape[0] // 3))


def _einsum(node: torch.fx.Node, _=None) -> int:
    """``torch.einsum`` of two operands: the product of the sizes of every subscript letter (each output element
    sums over the contracted letters); of one operand or more than two: not counted."""
    operands = [a for a in node.args[1:] if isinstance(a, torch.fx.Node)]
    eq = node.args[0]
    if len(operands) != 2 or not isinstance(eq, str) or "..." in eq:
        return 0
    infos = [_info(o) for o in operands]
    if any(i is None for i in infos):
        return 0
    sizes: dict[str, int] = {}
    for sub, info in zip(eq.replace(" ", "").partition("->")[0].split(","), infos):
        for c, n in zip(sub, info.shape):
            sizes[c] = max(sizes.get(c, 1), int(n))
    return _prod(sizes.values())


MAC_RULES: dict[str, Callable[[torch.fx.Node, Any], int]] = {
    "matmul": _out_times_k(0, "input"),  # F.linear, matmul, mm, bmm: output elements x the reduced dim
    "addmm": _out_times_k(1, "mat1"),
    "baddbmm": _out_times_k(1, "batch1"),
    "conv": _conv_fn(False),
    "conv_transpose": _conv_fn(True),
    "sdpa": _sdpa,
    "linear_layer": _linear_module,
    "conv_layer": _conv_module,
    "codebook_layer": _codebook_module,
    "attention_layer": _mha_module,
    "window_attention": _window_attention,
    "einsum": _einsum,
}
"""The MAC count of each ``macs`` kind that ``fxcompress/ops.py`` records name: ``rule(node, module or None)``."""


def node_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, modules: dict[str, nn.Module] | None = None) -> int:
    """The MACs of one node (``modules``: the module tree by name, if the caller has it)."""
    kind = ops.of_node(gm, node, "macs", modules)
    if kind is None:
        return 0
    module = (modules[node.target] if modules is not None else gm.get_submodule(node.target)) \
        if node.op == "call_module" else None
    return MAC_RULES[kind](node, module)


def _tensors_of(modules: dict[str, nn.Module], node: torch.fx.Node) -> list[tuple[torch.Tensor, bool]]:
    """(tensor, is_parameter) pairs a node owns: its module's parameters and buffers, or a get_attr tensor."""
    if node.op == "call_module":
        tree = list(named_modules(modules[node.target]))
        owned = {id(p): (p, True) for _, m in tree for p in m._parameters.values() if p is not None}
        for _, m in tree:
            owned.update((id(b), (b, False)) for b in m._buffers.values() if b is not None and id(b) not in owned)
        return list(owned.values())
    if node.op == "get_attr":
        path, _, leaf = node.target.rpartition(".")
        obj = getattr(modules[path], leaf) if path in modules else None
        if isinstance(obj, torch.Tensor):
            return [(obj, isinstance(obj, nn.Parameter))]
    return []


def node_costs(gm: torch.fx.GraphModule) -> list[NodeCost]:
    rows = []
    modules = dict(named_modules(gm))
    for node in gm.graph.nodes:
        owned = _tensors_of(modules, node)
        info = node.meta.get(meta.TENSOR)
        rows.append(NodeCost(
            node=node.name,
            op=node.op,
            target=node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target)),
            shape=meta.format_info(info) if info is not None else "?",
            params=sum(t.numel() for t, is_param in owned if is_param),
            macs=node_macs(gm, node, modules),
            weight_bytes=sum(t.numel() * t.element_size() for t, _ in owned),
            out_bytes=sum(i.nbytes for i in meta.iter_tensor_infos(info)) if node.op != "output" else 0,
        ))
    return rows


def totals(gm: torch.fx.GraphModule) -> Totals:
    """Graph totals; a tensor reached by several nodes (a shared module) is counted once."""
    seen: dict[int, tuple[torch.Tensor, bool]] = {}
    macs = 0
    modules = dict(named_modules(gm))
    for node in gm.graph.nodes:
        for t, is_param in _tensors_of(modules, node):
            seen[id(t)] = (t, is_param)
        macs += node_macs(gm, node, modules)
    return Totals(
        params=sum(t.numel() for t, p in seen.values() if p),
        macs=macs,
        weight_bytes=sum(t.numel() * t.element_size() for t, _ in seen.values()),
        nodes=len(gm.graph.nodes),
    )
