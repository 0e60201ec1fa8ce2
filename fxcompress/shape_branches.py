"""Python ``if`` on tensor shapes during symbolic tracing.

torch.fx cannot decide ``if new_h != H:`` when ``H`` comes from ``x.shape`` (timm's MobileViT blocks, padding to a
multiple of a patch or window size): the whole submodule would stay an opaque leaf.  ``ShapeBranches`` (mixed into
the tracer) runs the example inputs alongside the trace, every node on real values, and records which values
depend on tensor shapes only (``x.shape``, ``x.size()``, ``x.dim()`` and arithmetic on them).  A condition on such
a value takes the branch the example inputs take, and the graph gets ``torch._assert`` of that condition, so that
inputs whose shapes take the other branch fail loudly rather than run the wrong code.  ``int()`` of such a value
(timm's SAM ViT: ``int(2 * max(q_size, k_size) - 1)`` sizes its relative positions) is the example's value, and
the graph asserts it.  A condition on tensor *values* (``if x.sum() > 0``) still cannot be traced, as before.
"""
from __future__ import annotations

import contextlib
import operator
import sys
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from .errors import user_frame_text


def _unpatched():
    """A context in which fx's patches (recording module calls and wrapped functions) are undone."""
    revert = getattr(torch.fx._symbolic_trace, "_maybe_revert_all_patches", None)
    return revert() if revert is not None else contextlib.nullcontext()


_SHAPE_ATTRS = ("shape", "ndim", "dtype", "device", "is_cuda", "is_floating_point")
_SHAPE_METHODS = ("size", "dim", "numel", "nelement", "is_floating_point")
_UNKNOWN = object()  # a value the concrete run could not compute


class ShapeValueNeeded(torch.fx.proxy.TraceError):
    """A Python number was asked of a traced value (``int()``): the concrete run can give it where the value depends
    on input shapes only."""


class ShapeBranches:
    """Mixin for a ``torch.fx.Tracer``: call ``start_concrete_run(examples)`` in ``__init__`` (None: off)."""

    def start_concrete_run(self, examples: tuple | None) -> None:
        self.examples = None if examples is None else [t.clone() for t in examples]
        self.values: dict[torch.fx.Node, Any] = {}
        self.shape_only: set[torch.fx.Node] = set()
        self.branches: list[str] = []  # the shape conditions the graph was specialised on

    def create_proxy(self, kind, target, args, kwargs, *rest, **options):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        if self.examples is not None and isinstance(proxy, torch.fx.Proxy):
            self._concrete(proxy.node)
        return proxy

    def _concrete(self, node: torch.fx.Node) -> None:
        """The node's value on the example inputs, and whether it depends on tensor shapes only."""
        def value(a):
            if isinstance(a, torch.fx.Node) and a not in self.values and a.op == "get_attr":
                self.values[a] = self._run(a, (), {}, [])  # a tensor attribute fx recorded without a proxy
            return self.values.get(a, _UNKNOWN) if isinstance(a, torch.fx.Node) else a
        args = torch.fx.node.map_aggregate(node.args, value)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
        flat = [*pytree.tree_leaves(args), *pytree.tree_leaves(kwargs)]
        inputs = node.all_input_nodes
        try:
            with _unpatched():  # the modules and functions themselves, not fx's recording wrappers
                result = self._run(node, args, kwargs, flat)
        except Exception:  # noqa: BLE001 - a value the run cannot make only means no branch can be decided on it
            result = _UNKNOWN
        self.values[node] = result
        accessor = (node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS) or \
            (node.op == "call_method" and node.target in _SHAPE_METHODS) or \
            (node.op == "call_function" and node.target is len)
        derived = inputs and node.op in ("call_function", "call_method") and all(n in self.shape_only for n in inputs) \
            and not isinstance(result, torch.Tensor)
        if accessor or derived:
            self.shape_only.add(node)

    def _run(self, node: torch.fx.Node, args: Any, kwargs: Any, flat: list) -> Any:
        if node.op == "placeholder":
            index = sum(1 for n in self.values if n.op == "placeholder")
            return self.examples[index] if index < len(self.examples) else _UNKNOWN
        if node.op == "get_attr":
            value = self.root
            for atom in node.target.split("."):
                value = getattr(value, atom)
            return value
        if any(v is _UNKNOWN for v in flat):
            return _UNKNOWN
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.root.get_submodule(node.target)(*args, **kwargs)
        return _UNKNOWN

    def to_int(self, obj: torch.fx.Proxy) -> int:
        """``int()`` of a traced value: the example's value where it depends on shapes only (asserted in the
        graph); anything else cannot be traced (``ShapeValueNeeded``, which turns the concrete run on when it is
        off)."""
        return int(self._specialised(obj, "int()", (int, float)))

    def to_number(self, obj: torch.fx.Proxy, use: str, integral: bool = False) -> int | float:
        """The example's value of a traced number that depends on shapes only, for ``use`` (``int()``, an index of a
        real tensor, ``torch.tensor(...)``), with ``torch._assert`` of it in the graph; ``integral`` refuses a
        float."""
        return self._specialised(obj, use, (int,) if integral else (int, float))

    def _specialised(self, obj: torch.fx.Proxy, use: str, kinds: tuple[type, ...]) -> Any:
        value = self.values.get(obj.node, _UNKNOWN) if self.examples is not None else _UNKNOWN
        if obj.node not in self.shape_only or isinstance(value, bool) or not isinstance(value, kinds):
            raise ShapeValueNeeded(
                f"{use} of the symbolically traced value {obj.node.name}: a Python value is needed here, which "
                f"the trace has only for values that depend on input shapes and dtypes (as in control flow on them)")
        where = (user_frame_text(sys._getframe(1)) or "").strip().splitlines()
        source = where[-1].strip() if where else obj.node.name
        equal = self.create_proxy("call_function", operator.eq, (obj, value), {})
        self.create_proxy("call_function", torch._assert, (equal, f"traced for inputs whose shapes make `{source}` "
                          f"use the value {value}; trace the model again with inputs of these shapes"), {})
        self.branches.append(f"`{source}` -> {type(value).__name__} {value}")
        return value

    @contextlib.contextmanager
    def values_of_shapes(self):
        """While tracing, ``torch.tensor`` of traced numbers that depend on shapes only (DeBERTa's
        ``torch.tensor(q.size(-1), dtype=torch.float)``) makes the tensor of the example's values (``to_number``),
        and ``torch.finfo`` / ``torch.iinfo`` of a traced tensor's dtype (``torch.finfo(q.dtype).min``) describe the
        example's dtype, asserted in the graph."""
        make, finfo, iinfo = torch.tensor, torch.finfo, torch.iinfo

        def tensor(data, *args, **kwargs):
            if isinstance(data, (torch.fx.Proxy, list, tuple)):
                data = pytree.tree_map(lambda v: self.to_number(v, "torch.tensor()")
                                       if isinstance(v, torch.fx.Proxy) else v, data)
            return make(data, *args, **kwargs)

        def info(kind):
            def of(dtype=None):
                if isinstance(dtype, torch.fx.Proxy):
                    dtype = self._specialised(dtype, f"torch.{kind.__name__}()", (torch.dtype,))
                return kind() if dtype is None else kind(dtype)
            return of
        torch.tensor, torch.finfo, torch.iinfo = tensor, info(finfo), info(iinfo)
        try:
            yield
        finally:
            torch.tensor, torch.finfo, torch.iinfo = make, finfo, iinfo

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        value = self.values.get(obj.node, _UNKNOWN) if self.examples is not None else _UNKNOWN
        if obj.node not in self.shape_only or not isinstance(value, (bool, int)):
            return super().to_bool(obj)
        taken = bool(value)
        where = user_frame_text(sys._getframe(1)).strip().splitlines()
        source = where[-1].strip() if where else obj.node.name
        condition = obj if taken else self.create_proxy("call_function", operator.not_, (obj,), {})
        self.create_proxy("call_function", torch._assert, (condition, f"traced for inputs whose shapes make "
                          f"`{source}` {taken}; trace the model again with inputs of these shapes"), {})
        self.branches.append(f"`{source}` -> {taken}")
        return taken
