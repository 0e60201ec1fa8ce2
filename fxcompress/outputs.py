"""Output containers: the model's own classes kept across tracing and saving.

torch.fx records a forward's output containers by their base types (an ``OrderedDict``, a Hugging Face
``ModelOutput`` or any dict subclass as a plain dict) and cannot record a dataclass at all.  ``restore`` makes the
graph return the flat list of leaves and its generated code rebuild the model's containers from their pytree spec
(``_PyTreeCodeGen``, as torch.fx does for pytree inputs); ``record`` and ``register`` carry the classes of that
spec through ``save`` and ``fxc.load`` (a namedtuple or dataclass gets its qualified name as its serialised name).
"""
from __future__ import annotations

import collections
import dataclasses
import operator
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from .errors import InputError, SaveError


def unknown_container(value: Any) -> type | None:
    """The first container class in the output that pytree treats as a leaf (a dict, list or tuple subclass it has
    not registered), or None."""
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, (dict, list, tuple)):
            return type(leaf)
    return None


def register_dataclass(cls: type) -> None:
    """Make a dataclass a pytree node (as ``torch.export`` asks of dataclass outputs), so that its spec can be
    kept and rebuilt; a dataclass already registered is left as it is."""
    if cls not in pytree.SUPPORTED_NODES:
        pytree.register_dataclass(cls, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")


class OutputCodeGen(torch.fx.graph._PyTreeCodeGen):
    """fx's pytree code generator for the outputs only: the forward keeps its own signature (arguments with
    defaults and ``**kwargs`` included, which fx's flattening of inputs writes as invalid code: Hugging Face
    ResNet) and its code rebuilds the output containers of ``pytree_info.out_spec``."""

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, **options: Any) -> str:
        return torch.fx.graph.CodeGen.gen_fn_def(self, free_vars, maybe_return_annotation, **options)


def codegen(names: list[str], out_spec: pytree.TreeSpec) -> OutputCodeGen:
    """The code generator of a graph whose placeholders are ``names`` that returns ``out_spec``'s containers."""
    return OutputCodeGen(torch.fx.graph._PyTreeInfo(names, None, out_spec))


def restore(gm: torch.fx.GraphModule, spec: pytree.TreeSpec, got: Any) -> bool:
    """Make ``gm`` return the model's own output containers (``spec``: an ``OrderedDict``, a namedtuple, a dataclass,
    a Hugging Face ``ModelOutput``) where fx recorded their base types or built them in a node (``got``: what the
    graph returned on the example inputs): the graph returns the flat list of leaves, reading them out of any node
    that returns a container, and its code rebuilds the model's containers (``_PyTreeCodeGen``, as fx does for
    pytree inputs).  False when the leaves do not add up to ``spec``'s; the caller compares the rebuilt outputs with
    the model's, leaf by leaf."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    before = set(gm.graph.nodes)
    with gm.graph.inserting_before(output):
        leaves = graph_leaves(gm.graph, output.args[0], got)
    if len(leaves) != spec.num_leaves:
        for node in reversed([n for n in gm.graph.nodes if n not in before]):  # the reads just inserted
            gm.graph.erase_node(node)
        return False
    gm.graph._codegen = codegen([n.target for n in gm.graph.nodes if n.op == "placeholder"], spec)
    output.args = (leaves,)
    gm.recompile()
    return True


def graph_leaves(graph: torch.fx.Graph, arg: Any, value: Any) -> list:
    """The output's leaves as graph values, in pytree order: ``arg`` is the output node's argument (containers of
    nodes) and ``value`` what it evaluated to; a node whose value is a container is read out leaf by leaf."""
    if isinstance(arg, torch.fx.Node):
        paths = [path for path, _ in pytree.tree_flatten_with_path(value)[0]]
        if paths == [()]:
            return [arg]
        out = []
        for path in paths:
            node = arg
            for key in path:
                if isinstance(key, pytree.GetAttrKey):
                    node = graph.call_function(getattr, (node, key.name))
                else:
                    node = graph.call_function(operator.getitem, (node, getattr(key, "idx", getattr(key, "key", None))))
            out.append(node)
        return out
    if isinstance(arg, dict):
        return [leaf for k in arg for leaf in graph_leaves(graph, arg[k], value[k])]
    if isinstance(arg, (list, tuple)):
        return [leaf for a, v in zip(arg, value) for leaf in graph_leaves(graph, a, v)]
    return [arg]


_PLAIN_CONTAINERS = (tuple, list, dict, collections.OrderedDict, collections.defaultdict, collections.deque,
                     type(None))


def spec_classes(specs: list[pytree.TreeSpec]) -> list[type]:
    """The container classes of the specs that are not Python's own, in order of first appearance."""
    found: dict[type, None] = {}
    stack = list(reversed(specs))
    while stack:
        spec = stack.pop()
        cls = spec.context if spec.type is collections.namedtuple else spec.type  # a namedtuple's class: its context
        if cls is not None and cls not in _PLAIN_CONTAINERS:
            found.setdefault(cls)
        stack.extend(reversed(spec.children()))
    return list(found)


def record(cls: type, where: str) -> list[str]:
    """[qualified name, kind] of an output container class, its spec made serialisable: a namedtuple or dataclass
    gets a serialised name (its qualified name); any other pytree node must have one already."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    if cls not in pytree.SUPPORTED_SERIALIZED_TYPES:
        if issubclass(cls, tuple) and hasattr(cls, "_fields"):
            pytree._register_namedtuple(cls, serialized_type_name=name)
        elif not dataclasses.is_dataclass(cls):
            raise SaveError(f"{where}: the output container {name} is a pytree node without a serialised name; "
                            f"register it with torch.utils._pytree.register_pytree_node(..., "
                            f"serialized_type_name=...).")
    kind = "namedtuple" if issubclass(cls, tuple) else "dataclass" if dataclasses.is_dataclass(cls) and not \
        issubclass(cls, dict) else "node"
    return [name, kind]


def register(cls: type, kind: str, where: str) -> None:
    """Make a loaded output container class known to pytree under the name its saved spec uses."""
    if cls in pytree.SUPPORTED_SERIALIZED_TYPES:
        return
    name = f"{cls.__module__}.{cls.__qualname__}"
    if kind == "namedtuple" and issubclass(cls, tuple):
        pytree._register_namedtuple(cls, serialized_type_name=name)
    elif kind == "dataclass" and dataclasses.is_dataclass(cls):
        if cls not in pytree.SUPPORTED_NODES:
            pytree.register_dataclass(cls, serialized_type_name=name)
    else:
        raise InputError(f"fxc.load: {where} returns {name}, which is not registered as a pytree node after its "
                         f"module was imported; import what registers it before loading.")
