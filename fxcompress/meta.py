"""Every ``node.meta`` key fxcompress writes, with its value type, and shape propagation that fills them.

Keys are namespaced ``"fxc.*"``.  ``TENSOR`` is on every node after tracing and after every pass:

- a :class:`TensorInfo` for a tensor value,
- a tuple / list / dict of these for a structured value (``split``, ``nn.MultiheadAttention``, the output),
- a :class:`ValueInfo` for anything else (an ``int`` from ``x.size(0)``, ``None``, a ``torch.Size``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import operator
from typing import Any, Iterator

import torch
import torch.fx
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .modules import Observer

TENSOR = "fxc.tensor"  # TensorInfo | ValueInfo | tuple/list/dict of them: what the node produces
PROVENANCE = "fxc.provenance"  # tuple[str, ...]: "pass: what it did" lines, oldest first
AUTO_LEAF = "fxc.auto_leaf"  # str on call_module nodes: why tracing kept this submodule opaque

# GraphModule.meta key holding the TraceInfo of how the graph was made.
TRACE_INFO = "fxc.trace_info"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __str__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}"


@dataclasses.dataclass(frozen=True)
class ValueInfo:
    """A non-tensor value: its type name and, for shape-like values (int, bool, str, None), the value itself."""

    type_name: str
    value: Any = None

    def __str__(self) -> str:
        return f"{self.type_name}({self.value!r})" if self.value is not None else self.type_name


def describe(value: Any) -> Any:
    """The metadata describing a runtime value (see the module docstring)."""
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(int(d) for d in value.shape), value.dtype)
    if isinstance(value, torch.Size):
        return ValueInfo("Size", tuple(int(d) for d in value))
    if isinstance(value, (tuple, list)):
        return type(value)(describe(v) for v in value) if type(value) in (tuple, list) else tuple(describe(v) for v in value)
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    if isinstance(value, (bool, int, str)) or value is None:
        return ValueInfo(type(value).__name__, value)
    return ValueInfo(type(value).__name__)


def tensor_info(node: torch.fx.Node) -> TensorInfo | None:
    """The node's TensorInfo when it produces a single tensor, else None."""
    info = node.meta.get(TENSOR)
    return info if isinstance(info, TensorInfo) else None


def iter_tensor_infos(info: Any) -> Iterator[TensorInfo]:
    if isinstance(info, TensorInfo):
        yield info
    elif isinstance(info, (tuple, list)):
        for v in info:
            yield from iter_tensor_infos(v)
    elif isinstance(info, dict):
        for v in info.values():
            yield from iter_tensor_infos(v)


def add_provenance(node: torch.fx.Node, pass_name: str, what: str) -> None:
    node.meta[PROVENANCE] = tuple(node.meta.get(PROVENANCE, ())) + (f"{pass_name}: {what}",)


class _Recorder(torch.fx.Interpreter):
    """Runs the graph on real inputs and records what each node produced."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.observed: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        self.observed[n.name] = describe(result)
        return result


@contextlib.contextmanager
def side_effect_free(gm: torch.nn.Module) -> Iterator[None]:
    """Run forwards without lasting effects: no autograd, fixed RNG, buffers (BN statistics) restored, observers
    not recording."""
    # In training mode forwards update buffers (BN statistics): they run on clones, and the module's own tensors
    # are put back afterwards untouched (never written, so restore points sharing them stay valid).
    training = any(m.training for m in gm.modules())
    swapped = {m: m._buffers for m in gm.modules() if m._buffers} if training else {}
    clones: dict[int, torch.Tensor] = {}
    for m, buffers in swapped.items():
        m._buffers = {k: None if v is None else clones.setdefault(id(v), v.clone()) for k, v in buffers.items()}
    observers = [m for m in gm.modules() if isinstance(m, Observer) and m.enabled]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for m in observers:
            m.enabled = False
        try:
            yield
        finally:
            for m in observers:
                m.enabled = True
            for m, buffers in swapped.items():
                m._buffers = buffers


def _plain(value: Any) -> Any:
    """The Interpreter returns the output node's immutable_dict/immutable_list; the generated code plain ones.
    Other container classes (an OrderedDict the graph's code rebuilt) stay what they are."""
    if type(value) in (dict, immutable_dict):
        return {k: _plain(v) for k, v in value.items()}
    if type(value) in (list, immutable_list):
        return [_plain(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    return value


def observe(gm: torch.fx.GraphModule, inputs: tuple) -> tuple[dict[str, Any], Any]:
    """(node name → metadata, output) from running ``gm`` on ``inputs``, leaving ``gm`` unchanged."""
    recorder = _Recorder(gm)
    with side_effect_free(gm):
        out = recorder.run(*inputs)
    return recorder.observed, _plain(out)


def propagate(gm: torch.fx.GraphModule, inputs: tuple) -> Any:
    """Write ``TENSOR`` metadata on every node from a run on ``inputs``; returns the output."""
    observed, out = observe(gm, inputs)
    for node in gm.graph.nodes:
        node.meta[TENSOR] = observed[node.name]
    return out


def mismatches(gm: torch.fx.GraphModule, observed: dict[str, Any]) -> list[str]:
    """Nodes whose metadata is missing or differs from what a run observed, as readable lines."""
    problems = []
    for node in gm.graph.nodes:
        if TENSOR not in node.meta:
            problems.append(f"node {node.name!r} ({node.op} {_target_name(node)}) has no {TENSOR!r} metadata")
        elif node.meta[TENSOR] != observed.get(node.name):
            problems.append(
                f"node {node.name!r} ({node.op} {_target_name(node)}) records {format_info(node.meta[TENSOR])} "
                f"but produces {format_info(observed.get(node.name))}"
            )
    return problems


_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                                operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                                operator.ilshift, operator.irshift, operator.imatmul, operator.setitem})


def writes_in_place(node: torch.fx.Node) -> bool:
    """Whether ``node`` modifies a tensor it reads: ``x.mul_(2)``, ``torch.relu_``, ``x += y``, ``x[i] = v``,
    ``inplace=True`` (an argument or a module's attribute, nn.ReLU(inplace=True))."""
    if node.kwargs.get("inplace") is True or "out" in node.kwargs:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_") or node.target == "__setitem__"
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):  # an ATen op (torch.export's graphs): its schema says
            return node.target._schema.is_mutable
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))
    if node.op == "call_module" and node.graph.owning_module is not None:
        return getattr(node.graph.owning_module.get_submodule(node.target), "inplace", False) is True
    return False


def eliminate_dead_code(graph: torch.fx.Graph) -> bool:
    """torch.fx's dead-code elimination, keeping nodes that write to a tensor in place: fx treats method calls as
    pure and would drop ``x.mul_(2)`` when its result is unused, changing what later uses of ``x`` read."""
    return graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or writes_in_place(n))


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def format_info(info: Any) -> str:
    if isinstance(info, (tuple, list)):
        return "(" + ", ".join(format_info(i) for i in info) + ")"
    if isinstance(info, dict):
        return "{" + ", ".join(f"{k}: {format_info(v)}" for k, v in info.items()) + "}"
    return str(info)
