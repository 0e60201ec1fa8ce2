"""Restore points: what the PassManager keeps of a module before each pass, without copying it.

A ``RestorePoint(gm)`` records, for every module of the tree, its attribute table and its parameter, buffer and
submodule tables (shallow copies: the same tensor and module objects), and for every graph the list of its nodes
with their arguments (the same tuples) and metadata.  Passes replace tensors, submodules, attributes and nodes;
they do not write into the objects a restore point refers to, so this is a faithful copy that costs a few
dictionary copies per module and a tuple per node, far less than a graph copy, let alone ``copy.deepcopy``.

A pass that does write into tensors (training, calibration, masking) declares ``writes_tensors``; its restore
point clones the tensors (ties kept).  ``written()`` lists the shared tensors written to anyway, so the manager
names a pass that broke the rule instead of restoring a module that is no longer what the pass received.

``restore()`` puts the recorded state back into the live objects (after a failure); ``module()`` builds a
separate runnable module in that state (the float64 recheck of an EXACT pass compares it with the new one).
"""
from __future__ import annotations

import collections
from typing import Any

import torch
import torch.fx

from .tree import GraphRecord, named_modules, named_tensors

_TABLES = ("_parameters", "_buffers", "_modules")
_COPIED = (dict, collections.OrderedDict, set, list)


class RestorePoint:
    """The module as a pass received it (see the module docstring)."""

    def __init__(self, gm: torch.fx.GraphModule, clone_tensors: bool = False,
                 tensors: list[tuple[str, torch.Tensor]] | None = None):
        """``tensors`` is ``tree.named_tensors(gm)`` if the caller has it."""
        self.cloned = clone_tensors
        self._gm = gm
        clones: dict[int, torch.Tensor] = {}
        self._modules: list[tuple[torch.nn.Module, dict[str, Any]]] = []
        self._graphs: dict[int, GraphRecord] = {}
        seen: set[int] = set()
        with torch.no_grad():
            for _, m in named_modules(gm):
                if id(m) in seen:
                    continue
                seen.add(id(m))
                state = dict(m.__dict__)
                for key in _TABLES:
                    state[key] = dict(state[key])
                for key, value in state.items():
                    if key not in _TABLES and type(value) in _COPIED and value:
                        state[key] = type(value)(value)
                if clone_tensors:
                    for key in ("_parameters", "_buffers"):
                        state[key] = {k: _clone(t, clones) for k, t in state[key].items()}
                if isinstance(m, torch.fx.GraphModule):
                    self._graphs[id(m)] = GraphRecord(m.graph)
                self._modules.append((m, state))
        self._shared: list[tuple[str, torch.Tensor, int, int]] = []
        if not clone_tensors:
            tensors = named_tensors(gm) if tensors is None else tensors
            self._shared = [(name, t, t._version, t.data_ptr()) for name, t in tensors]

    def written(self) -> list[str]:
        """Names of shared tensors written in place since the restore point was taken."""
        return [name for name, t, version, ptr in self._shared if t._version != version or t.data_ptr() != ptr]

    def unchanged(self, gm: torch.fx.GraphModule) -> bool | None:
        """Whether ``gm`` is still exactly as recorded: the same module objects with the same attributes (values
        compared by identity, plain values by equality), tables and graphs.  For a restore point of shared tensors
        that were not written (``written()`` empty) that settles it; with cloned tensors the values may have
        changed in place, so the answer is None (unknown: compare the values)."""
        if self.cloned:
            return None
        if self.changed_graphs(gm):
            return False
        recorded = {id(m) for m, _ in self._modules}
        if any(id(m) not in recorded for _, m in named_modules(gm)):
            return False
        return all(_same_state(m.__dict__, state) for m, state in self._modules)

    def changed_graphs(self, gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
        """The GraphModules in ``gm``'s tree whose graph is not what was recorded (new ones included)."""
        return [m for _, m in named_modules(gm) if isinstance(m, torch.fx.GraphModule)
                and not (id(m) in self._graphs and self._graphs[id(m)].same_as(m.graph))]

    def restore(self) -> torch.fx.GraphModule:
        """Put the recorded state back into the live module objects and return the root, runnable."""
        for m, state in self._modules:
            m.__dict__ = dict(state)
            for key in _TABLES:
                m.__dict__[key] = dict(state[key])
            if id(m) in self._graphs:
                self._install_graph(m, self._graphs[id(m)].build())
        return self._gm

    def module(self) -> torch.fx.GraphModule:
        """A separate module in the recorded state (new module objects, the recorded tensors), runnable."""
        new: dict[int, torch.nn.Module] = {}
        for m, _ in self._modules:
            new[id(m)] = (torch.fx.GraphModule.__new__(type(m)) if isinstance(m, torch.fx.GraphModule)
                          else object.__new__(type(m)))
        for m, state in self._modules:
            copy = new[id(m)]
            copy.__dict__ = dict(state)
            copy.__dict__["_parameters"] = dict(state["_parameters"])
            copy.__dict__["_buffers"] = dict(state["_buffers"])
            copy.__dict__["_modules"] = {k: None if c is None else new[id(c)] for k, c in state["_modules"].items()}
        for m, _ in self._modules:
            if id(m) in self._graphs:
                self._install_graph(new[id(m)], self._graphs[id(m)].build())
        return new[id(self._gm)]

    @staticmethod
    def _install_graph(m: torch.fx.GraphModule, graph: torch.fx.Graph) -> None:
        graph.owning_module = m
        m.__dict__["_graph"] = graph
        m.recompile()


def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if type(a) in _COPIED:
        if len(a) != len(b):
            return False
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
        if isinstance(a, set):
            return a == b
        return all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (bool, int, float, str, bytes, type(None), tuple, torch.Size, torch.dtype, torch.device)):
        try:
            return bool(a == b)
        except Exception:  # noqa: BLE001 - a tuple holding tensors: compared by identity above
            return False
    return False


def _same_state(now: dict[str, Any], recorded: dict[str, Any]) -> bool:
    return now.keys() == recorded.keys() and all(_same_value(now[k], recorded[k]) for k in now)


def _clone(t: torch.Tensor | None, clones: dict[int, torch.Tensor]) -> torch.Tensor | None:
    if t is None:
        return None
    if id(t) not in clones:
        clones[id(t)] = (torch.nn.Parameter(t.detach().clone(), t.requires_grad) if isinstance(t, torch.nn.Parameter)
                         else t.detach().clone())
    return clones[id(t)]
