"""The second front end: graph capture by ``torch.export``, normalised to the graph the passes read.

Symbolic tracing (``tracing.trace``) runs the forward on proxies, so Python that looks at shapes or values stops it:
iterating a size, assigning into a tensor, masks built with ``vmap``, forwards wrapped by decorators that take
``*args``.  Most of Hugging Face transformers 5 is written so, and ``torch.export`` (non-strict) is the capture it
supports: the forward runs for real on fake tensors and the ATen ops it dispatches are recorded, with the batch and
sequence dimensions symbolic (``_dynamic_rank``).  ``export_graph`` turns that record into the graph the passes read:

- a call of a built-in layer (``nn.Linear``, ``nn.Conv2d``, ``nn.LayerNorm``, ``nn.Embedding``, BatchNorm, an
  activation module, ...) with one tensor in and one out becomes one ``call_module`` node on the model's own module
  (export keeps every node's module path, ``nn_module_stack``);
- every other ATen op becomes the function or Tensor method of the same meaning that the op registry knows
  (``aten.add.Tensor`` -> ``Tensor.add``, ``aten.scaled_dot_product_attention`` -> ``F.scaled_dot_product_attention``,
  ``aten.slice.Tensor`` -> indexing); an op with none stays an ATen call, which the passes treat as any op they do
  not know (pruning stops at it);
- export's shape guards and metadata asserts are dropped, and lifted constants become attributes of the module.

The caller (``tracing.trace``) checks the result against the model on the example inputs, as every trace is checked.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from . import meta, ops
from .tree import named_modules

_DROPPED = frozenset({"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size",
                      "sym_constrain_range", "_assert_async"})
_IDENTITY = frozenset({"alias", "lift_fresh_copy"})
_FACTORY_ONLY_KWARGS = ("pin_memory",)  # ATen factory arguments the Python functions do not take
_MAX_END = 2 ** 63 - 1  # ATen's "to the end" of a slice


def export_graph(model: nn.Module, inputs: tuple, keywords: tuple[str, ...] | None = None) -> torch.fx.Graph:
    """The graph torch.export records for ``model`` on ``inputs`` (their dimensions dynamic where the model lets them
    be, ``_dynamic_rank``; a batch of one is exported as two, so that it is not fixed at one), normalised (module
    docstring).  The
    constants export lifts out of the forward become non-persistent buffers of ``model`` (a copy the caller owns),
    under the names the graph reads them by.  ``keywords``: the inputs are the forward's arguments of those names."""
    dims = tuple({d: torch.export.Dim.AUTO for d in range(_dynamic_rank(t))} for t in inputs)
    probe = tuple(torch.cat([t, t]) if t.dim() >= 2 and t.shape[0] == 1 else t for t in inputs)
    if keywords:
        program = torch.export.export(model, (), dict(zip(keywords, probe)), strict=False,
                                      dynamic_shapes=dict(zip(keywords, dims)))
    else:
        program = torch.export.export(model, probe, dynamic_shapes=dims, strict=False)
    exported = program.module()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    for node in exported.graph.nodes:
        if node.op == "get_attr":
            value = _attribute(exported, node.target)
            if isinstance(value, torch.Tensor) and not _has_tensor(model, node.target):
                owner, _, name = node.target.rpartition(".")
                model.get_submodule(owner).register_buffer(name, value.detach().clone(), persistent=False)
        env[node] = _copy_node(graph, node, env)
    _collapse_layers(graph, model)
    for node in list(graph.nodes):
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            _to_torch(node)
    graph.owning_module = model  # the purity check of call_module nodes looks the modules up
    meta.eliminate_dead_code(graph)
    graph.owning_module = None
    graph.lint()
    return graph


def _dynamic_rank(t: torch.Tensor) -> int:
    """How many leading dims of an input are exported as dynamic: all of token ids, masks and sequences (integer or
    boolean tensors, float tensors of up to three dims: batch, length, features), only the batch of images and
    volumes (float tensors of four dims or more), whose spatial sizes made export reason symbolically through every
    window partition (a two-stage Swin: 71 s with dynamic height and width, against seconds without)."""
    if t.dim() >= 4 and t.is_floating_point():
        return 1
    return t.dim()


def _attribute(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _has_tensor(model: nn.Module, target: str) -> bool:
    try:
        return isinstance(_attribute(model, target), torch.Tensor)
    except AttributeError:
        return False


def _copy_node(graph: torch.fx.Graph, node: torch.fx.Node, env: dict) -> Any:
    """``node`` copied into ``graph``: export's guards and asserts dropped, its flat output kept flat."""
    if node.op == "call_module":  # export's shape guard function (``_guards_fn``): the trace's check replaces it
        return None
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        name = node.target.overloadpacket.__name__
        if name in _DROPPED:
            return None
        if name in _IDENTITY and node.args and isinstance(node.args[0], torch.fx.Node):
            return env[node.args[0]]
    if node.op == "output":
        outputs = node.args[0]
        return graph.output(torch.fx.map_arg(list(outputs) if isinstance(outputs, (tuple, list)) else [outputs],
                                             env.__getitem__))
    new = graph.node_copy(node, env.__getitem__)
    new.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val", "stack_trace")}
    return new


# ---- built-in layers back to modules -----------------------------------------------------------------------------

def _collapse_layers(graph: torch.fx.Graph, model: nn.Module) -> None:
    """Replace the ops of each call of a built-in layer module by one ``call_module`` node, where the call takes one
    tensor (besides the module's own parameters and buffers) and gives one."""
    modules = dict(named_modules(model))
    leaf = torch.fx.Tracer()
    groups: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key, (path, _) = list(stack.items())[-1]
        path = _plain_path(path)
        module = modules.get(path)
        if module is not None and leaf.is_leaf_module(module, path):
            groups.setdefault(f"{key}|{path}", []).append(node)
    attributes = [n for n in graph.nodes if n.op == "get_attr"]
    for key, nodes in groups.items():
        path = key.split("|", 1)[1]
        inside = set(nodes)
        own = {n for n in attributes if n.target.startswith(path + ".")}
        inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes
                                    if a not in inside and a not in own))
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1 or not _is_tensor(inputs[0]) or not _is_tensor(outputs[0]):
            continue
        with graph.inserting_before(outputs[0]):
            call = graph.call_module(path, (inputs[0],))
        call.meta = dict(outputs[0].meta)
        outputs[0].replace_all_uses_with(call)
        for n in reversed(nodes):
            if not n.users:
                graph.erase_node(n)


def _plain_path(path: str) -> str:
    """A module path as ``named_modules`` spells it (export may spell ``L['self'].layer[0]``)."""
    path = path.removeprefix("L['self']").removeprefix("L__self__").lstrip(".")
    return path.replace("[", ".").replace("]", "").replace("'", "")


def _is_tensor(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


# ---- ATen ops back to the functions the registry knows -------------------------------------------------------------

_OPERATORS = {f"__{n}__": getattr(operator, n.rstrip("_") + "_" if n in ("and", "or") else n)
              for n in ("and", "or", "xor", "invert", "lshift", "rshift")}


def _to_torch(node: torch.fx.Node) -> None:
    """Retarget an ATen call to the function or Tensor method of the same meaning, where there is one."""
    name = node.target.overloadpacket.__name__
    special = _SPECIAL.get(name)
    if special is not None:
        special(node)
        return
    if name in _OPERATORS:
        node.target = _OPERATORS[name]
        return
    kwargs = {k: v for k, v in node.kwargs.items() if k not in _FACTORY_ONLY_KWARGS}
    schema = node.target._schema
    takes_self = bool(schema.arguments) and schema.arguments[0].name == "self"
    candidates: list[tuple[str, Any]] = []
    if hasattr(F, name) and not name.startswith("_"):
        candidates.append(("call_function", getattr(F, name)))
    if takes_self and hasattr(torch.Tensor, name) and not name.startswith("_"):
        candidates.append(("call_method", name))
    if hasattr(torch, name) and not name.startswith("_") and callable(getattr(torch, name)):
        candidates.append(("call_function", getattr(torch, name)))
    if not candidates:
        return
    known = [c for c in candidates if _registered(*c)]
    op, target = (known or candidates)[0]
    node.op, node.target, node.kwargs = op, target, kwargs


def _registered(op: str, target: Any) -> bool:
    fn = getattr(torch.Tensor, target, None) if op == "call_method" else target
    return ops.OPS.get(fn) is not None


def _set(node: torch.fx.Node, op: str, target: Any, args: tuple, kwargs: dict | None = None) -> None:
    node.op, node.target, node.args, node.kwargs = op, target, tuple(args), dict(kwargs or {})


def _slice(node: torch.fx.Node) -> None:
    x, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
    end = None if end == _MAX_END else end
    start = None if start == 0 else start
    if start is None and end is None and step == 1:  # the whole dimension: the tensor itself
        node.replace_all_uses_with(x)
        node.graph.erase_node(node)
        return
    _set(node, "call_function", operator.getitem,
         (x, (*(slice(None),) * dim, slice(start, end, None if step == 1 else step))))


def _index(node: torch.fx.Node) -> None:
    x, indices = node.args[:2]
    _set(node, "call_function", operator.getitem, (x, tuple(slice(None) if i is None else i for i in indices)))


def _sym_size(node: torch.fx.Node) -> None:
    _set(node, "call_method", "size", node.args)


def _embedding(node: torch.fx.Node) -> None:
    weight, indices, padding_idx = (list(node.args) + [-1])[:3]
    _set(node, "call_function", F.embedding, (indices, weight), {"padding_idx": None if padding_idx == -1 else
                                                                 padding_idx})


def _layer_norm(node: torch.fx.Node) -> None:
    _set(node, "call_function", F.layer_norm, node.args[:5])


def _group_norm(node: torch.fx.Node) -> None:
    _set(node, "call_function", F.group_norm, node.args[:5])


def _batch_norm(node: torch.fx.Node) -> None:
    x, weight, bias, mean, var, training, momentum, eps = node.args[:8]
    _set(node, "call_function", F.batch_norm, (x, mean, var, weight, bias, training, momentum, eps))


def _softmax(node: torch.fx.Node) -> None:
    _set(node, "call_function", torch.softmax, node.args[:2])


def _pad(node: torch.fx.Node) -> None:
    x, pad, value = (list(node.args) + [0.0])[:3]
    _set(node, "call_function", F.pad, (x, pad), {"value": value})


def _to(node: torch.fx.Node) -> None:
    """``aten.to`` and ``aten._to_copy`` in every overload: ``Tensor.to`` (which takes no ``layout``)."""
    _set(node, "call_method", "to", node.args, {k: v for k, v in node.kwargs.items()
                                                if k in ("dtype", "device", "non_blocking", "copy", "memory_format")})


def _numpy_t(node: torch.fx.Node) -> None:
    """``x.T`` (Falcon's linear layers: ``x @ self.weight.T``): its axes reversed, ``Tensor.permute``."""
    value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if isinstance(value, torch.Tensor):
        _set(node, "call_method", "permute", (node.args[0], tuple(reversed(range(value.dim())))))


def _vector_norm(node: torch.fx.Node) -> None:  # the same arguments; torch has it under torch.linalg only
    _set(node, "call_function", torch.linalg.vector_norm, node.args, dict(node.kwargs))


_SPECIAL = {"slice": _slice, "index": _index, "sym_size": _sym_size, "embedding": _embedding,
            "linalg_vector_norm": _vector_norm, "layer_norm": _layer_norm, "group_norm": _group_norm,
            "batch_norm": _batch_norm, "_softmax": _softmax, "constant_pad_nd": _pad, "_to_copy": _to, "to": _to,
            "numpy_T": _numpy_t}
