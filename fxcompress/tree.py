"""Fast walks and copies of a module tree.

``torch.nn.Module.named_modules``/``named_parameters`` and ``copy.deepcopy`` are generic and slow on deep trees (a
512-block residual chain has 5,000 modules: one ``deepcopy`` takes longer than pruning it).  These do the same for
the common case and fall back to ``copy.deepcopy`` for anything unusual:

- ``named_tensors(m)``: every parameter and buffer with its qualified name, duplicates (tied tensors) included,
  in ``named_parameters`` then ``named_buffers`` order.
- ``copy_tree(m)``: a deep copy of the module tree; ties and modules used twice stay one object.  With
  ``share_tensors`` the copy borrows the original's parameters and buffers (a new tree over the same tensors);
  ``own_tensors`` later replaces the borrowed ones by copies, before anything writes into them.
- ``GraphRecord(graph)`` / ``copy_graph(graph)``: a graph's nodes as they are now, and a graph built from them.
"""
from __future__ import annotations

import collections
import copy
import functools
import types
from typing import Any, Iterator

import torch
import torch.fx

_IMMUTABLE = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device, torch.layout,
              torch.memory_format, torch.Size, type, types.FunctionType, types.BuiltinFunctionType)
_PLAIN = frozenset({int, float, bool, str, type(None)})
_MODULE_STATE = {torch.nn.Module.__getstate__}


def named_modules(m: torch.nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.nn.Module]]:
    """``m.named_modules(remove_duplicate=False)`` without the generator-per-level overhead (pre-order)."""
    stack = [(prefix, m)]
    while stack:
        name, mod = stack.pop()
        yield name, mod
        children = [(f"{name}.{k}" if name else k, c) for k, c in mod._modules.items() if c is not None]
        stack.extend(reversed(children))


def named_tensors(m: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter, then every buffer, with qualified names; tied tensors appear under each name."""
    modules = list(named_modules(m))
    params = [(f"{n}.{k}" if n else k, p) for n, mod in modules for k, p in mod._parameters.items() if p is not None]
    buffers = [(f"{n}.{k}" if n else k, b) for n, mod in modules for k, b in mod._buffers.items() if b is not None]
    return params + buffers


@functools.cache
def _plain_module(cls: type) -> bool:
    """Whether copying ``cls``'s ``__dict__`` is what ``copy.deepcopy`` does (no custom copy or pickling hooks)."""
    return ("__deepcopy__" not in dir(cls) and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and cls.__getstate__ in _MODULE_STATE
            and (cls.__setstate__ is torch.nn.Module.__setstate__ or cls.__setstate__.__module__.startswith("torch.")))


class _Copier:
    def __init__(self, share_tensors: bool = False):
        self.memo: dict[int, Any] = {}
        self.keep: list[Any] = []  # originals stay alive while copying, so ids are not reused (as deepcopy does)
        self.share_tensors = share_tensors

    def value(self, v: Any) -> Any:
        if isinstance(v, _IMMUTABLE):
            return v
        key = id(v)
        if key in self.memo:
            return self.memo[key]
        if isinstance(v, torch.Tensor):
            if type(v) is torch.nn.Parameter and not v._is_view():
                out = torch.nn.Parameter(v.detach().clone(), v.requires_grad)
            elif type(v) is torch.Tensor and not v._is_view() and not v.requires_grad:
                out = v.clone()
            else:  # views keep sharing their base's storage, subclasses their extra state
                out = v.__deepcopy__(self.memo)
        elif isinstance(v, torch.nn.Module):
            return self.module(v)
        elif type(v) in (dict, collections.OrderedDict):
            out = self.memo[key] = type(v)()
            out.update((k, self.value(x)) for k, x in v.items())
        elif type(v) is list:
            out = self.memo[key] = []
            out.extend(self.value(x) for x in v)
        elif type(v) is tuple:
            if all(type(x) in _PLAIN for x in v):  # kernel sizes, strides, paddings: nothing to copy
                return v
            out = tuple(self.value(x) for x in v)
        elif type(v) in (set, frozenset):
            out = type(v)(self.value(x) for x in v)
        else:
            return copy.deepcopy(v, self.memo)
        self.memo[key] = out
        self.keep.append(v)
        return out

    def module(self, m: torch.nn.Module) -> torch.nn.Module:
        key = id(m)
        if key in self.memo:
            return self.memo[key]
        cls = type(m)
        if isinstance(m, torch.fx.GraphModule):
            new = torch.fx.GraphModule.__new__(cls)  # a singleton class of its own, as GraphModule makes
        elif _plain_module(cls):
            new = object.__new__(cls)
        else:
            return copy.deepcopy(m, self.memo)
        self.memo[key] = new
        self.keep.append(m)
        state = {}
        for k, v in m.__dict__.items():
            if k == "_graph":
                state[k] = copy_graph(v)
                state[k].owning_module = new
            elif k == "_modules":
                state[k] = {name: None if c is None else self.module(c) for name, c in v.items()}
            elif k in ("_parameters", "_buffers"):
                state[k] = dict(v) if self.share_tensors else {name: self.value(t) for name, t in v.items()}
            elif type(v) in (dict, collections.OrderedDict, set, list) and not v:
                state[k] = type(v)()  # hook tables and the like: mostly empty
            else:
                state[k] = self.value(v)
        new.__dict__ = state
        return new


def copy_tree(m: torch.nn.Module, share_tensors: bool = False) -> torch.nn.Module:
    """A deep copy of ``m``'s module tree, runnable (GraphModules in it get a copy of their graph and its code);
    with ``share_tensors`` the copy holds ``m``'s own parameter and buffer objects (see ``own_tensors``)."""
    with torch.no_grad():
        new = _Copier(share_tensors).module(m)
    for mod in new.modules():
        if isinstance(mod, torch.fx.GraphModule) and "forward" not in vars(type(mod)):
            mod.recompile()
    return new


def own_tensors(m: torch.nn.Module, borrowed: set[int]) -> int:
    """Replace every tensor of ``m``'s tree whose id is in ``borrowed`` (parameters, buffers, tensor attributes)
    by a copy, ties kept; returns how many tensors were copied."""
    copier = _Copier()
    with torch.no_grad():
        for _, mod in named_modules(m):
            for table in (mod._parameters, mod._buffers):
                for k, t in table.items():
                    if t is not None and id(t) in borrowed:
                        table[k] = copier.value(t)
            for k, v in list(mod.__dict__.items()):
                if isinstance(v, torch.Tensor) and id(v) in borrowed:
                    mod.__dict__[k] = copier.value(v)
    return sum(1 for v in copier.memo.values() if isinstance(v, torch.Tensor))


class GraphRecord:
    """The nodes of a graph in order, each with the argument tuples and metadata it had: ``build`` makes a new graph
    of them (a copy of the graph as it was), ``same_as`` tells whether a graph still is what was recorded."""

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self.codegen = graph._codegen
        self.nodes = [(n, n.op, n.target, n.args, n.kwargs, n.name, n.type, dict(n.meta)) for n in graph.nodes]

    def same_as(self, graph: torch.fx.Graph) -> bool:
        """Whether ``graph`` is the recorded graph with the same nodes, in order, each with the same target and
        the same argument tuples (a rewrite always binds new ones)."""
        if graph is not self.graph or len(graph.nodes) != len(self.nodes):
            return False
        return all(n is old and n.args is args and n.kwargs is kwargs and n.target == target and n.op == op
                   for n, (old, op, target, args, kwargs, *_) in zip(graph.nodes, self.nodes))

    def build(self) -> torch.fx.Graph:
        """A new graph with the recorded nodes (fresh Node objects)."""
        new = torch.fx.Graph(tracer_cls=self.graph._tracer_cls)
        new._codegen = self.codegen
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for old, op, target, args, kwargs, name, type_expr, node_meta in self.nodes:
            node = new.create_node(op, target, torch.fx.map_arg(args, env.__getitem__),
                                   torch.fx.map_arg(kwargs, env.__getitem__), name, type_expr)
            node.meta = dict(node_meta)
            env[old] = node
        return new


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A node-for-node copy of ``graph`` (node names, metadata dicts and codegen kept)."""
    return GraphRecord(graph).build()
