"""Symbolic tracing of a user's model into a GraphModule carrying shape/dtype metadata on every node.

``trace`` deep-copies the model (the user's object is never touched), traces it with ``torch.fx``, and runs the
example inputs through the graph to write ``meta.TENSOR`` on every node.  A submodule whose forward cannot be
traced (data-dependent control flow, ``len`` of a proxy, ...) is retried as an opaque leaf; the reason is kept in
``TraceInfo.auto_leaves`` and on the node (``meta.AUTO_LEAF``).  When the top-level forward itself cannot be
traced, a ``TracingError`` names the module, the user's source line and what to do.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import operator
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree

from . import capture, meta, outputs
from .errors import (
    InputError,
    TopLevelUntraceable,
    TracingError,
    did_you_mean,
    unknown_name_message,
    user_frame_from_exception,
    user_frame_text,
)
from .lowbit import LEAF_MODULES
from .modules import GRAPH_FUNCTIONS
from .persist import CompiledModule
from .shape_branches import ShapeBranches, ShapeValueNeeded
from .tree import copy_tree

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TraceInfo:
    """How a graph was made: time, size, and which submodules were kept opaque and why."""

    seconds: float
    nodes: int
    leaf_modules: tuple[str, ...]  # asked for by the user
    auto_leaves: dict[str, str]  # qualified name -> why it could not be traced
    inlined_functions: tuple[str, ...] = ()  # custom autograd.Functions traced through (their backward is lost)
    copied_inputs: tuple[str, ...] = ()  # inputs the forward modifies in place: the graph copies them first
    front_end: str = "fx"  # "fx" (symbolic tracing) or "export" (torch.export, when symbolic tracing failed)
    fx_failure: str = ""  # why symbolic tracing failed, when torch.export made the graph
    dynamic_dims: tuple[tuple[int, ...], ...] = ()  # per input, the dims torch.export kept symbolic (ONNX export)
    shape_branches: tuple[str, ...] = ()  # Python ifs on input shapes, taken as the example inputs take them


FLOAT_DTYPES = (torch.float32, torch.float64)  # float16/bfloat16 would fail the float32 tolerances of every check


class _CustomFunctionCall(Exception):
    """A submodule's forward called a custom ``torch.autograd.Function`` on traced values."""


@contextlib.contextmanager
def _autograd_function_calls(hook: Callable[[type, tuple, dict], None]):
    """Call ``hook(cls, args, kwargs)`` before every ``torch.autograd.Function.apply`` while the block runs."""
    base = torch.autograd.function.Function
    original = base.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        hook(cls, args, kwargs)
        return original.__get__(None, cls)(*args, **kwargs)  # a classmethod, or in C a classmethod_descriptor

    base.apply = classmethod(apply)
    try:
        yield
    finally:
        base.apply = original


def _watch_autograd_functions(tracer: _Tracer):
    """While tracing, a custom ``torch.autograd.Function`` called inside a submodule makes that submodule an
    opaque leaf (inlined, its forward would be kept and its backward lost); called from the top-level forward, it is
    inlined and recorded in ``tracer.inlined`` so that the training passes can refuse the graph."""
    def hook(cls: type, args: tuple, kwargs: dict) -> None:
        if any(isinstance(a, torch.fx.Proxy) for a in pytree.tree_leaves((args, kwargs))):
            if tracer.depth > 0:
                raise _CustomFunctionCall(f"it calls the custom autograd.Function {cls.__qualname__}, whose backward "
                                          f"tracing cannot keep")
            tracer.inlined.append(cls.__qualname__)
    return _autograd_function_calls(hook)


def _record_autograd_functions(inlined: list[str]):
    """While torch.export captures a forward, every custom ``torch.autograd.Function`` it calls (export keeps its
    forward's ops and loses its backward) is recorded in ``inlined``, so that the training passes refuse the graph."""
    def hook(cls: type, args: tuple, kwargs: dict) -> None:
        if not cls.__module__.startswith("torch."):
            inlined.append(cls.__qualname__)
    return _autograd_function_calls(hook)


@contextlib.contextmanager
def _state_kept(root: torch.nn.Module):
    """A forward that caches a computed tensor on its module (timm ConViT: ``self.rel_indices = ...``) leaves a
    Proxy there after tracing, and the module then fails in eager mode; every such attribute gets its value from
    before the trace back (or is removed, if it was new)."""
    before = {m: {**m.__dict__, **m._buffers} for m in root.modules()}
    try:
        yield
    finally:
        for m, saved in before.items():
            for store in (m._buffers, m.__dict__):
                for name in [k for k, v in store.items() if isinstance(v, torch.fx.Proxy)]:
                    if name in saved:
                        store[name] = saved[name]
                    else:
                        del store[name]


class _SubmoduleUntraceable(Exception):
    def __init__(self, qualname: str, module: torch.nn.Module, cause: BaseException):
        super().__init__(qualname)
        self.qualname, self.module, self.cause = qualname, module, cause


class _Tracer(ShapeBranches, torch.fx.Tracer):
    """``examples`` (the example inputs) turns on the concrete run of ``ShapeBranches``: a Python ``if`` on input
    shapes takes the branch the example inputs take, and the graph asserts it."""

    # Defaults are needed: unpickling a GraphModule re-creates its tracer class with no arguments.
    def __init__(self, leaves: set[str] | None = None, leaf_types: tuple[type, ...] = (),
                 examples: tuple | None = None):
        super().__init__(autowrap_functions=GRAPH_FUNCTIONS)  # a compiled module traces again as it is
        self.record_stack_traces = False  # torch's full stack capture costs 1 ms a node; create_node keeps one frame
        self.depth = 0  # submodule calls being traced through
        self.inlined: list[str] = []
        self.leaves = leaves if leaves is not None else set()
        self.leaf_types = leaf_types
        self.start_concrete_run(examples)

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if isinstance(m, LEAF_MODULES):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _Proxy(node, self)

    def trace(self, root, concrete_args=None) -> torch.fx.Graph:
        with self.values_of_shapes():
            return super().trace(root, concrete_args)

    def create_node(self, *args, **kwargs) -> torch.fx.Node:
        node = super().create_node(*args, **kwargs)
        if not node.stack_trace and node.op not in ("placeholder", "output"):  # made outside the forward
            node.stack_trace = user_frame_text(sys._getframe(1))
        return node

    def create_arg(self, a: Any) -> Any:
        """fx records containers by their base type (a dict subclass as a dict) and cannot record a dataclass:
        its leaves are recorded as a list, and ``outputs.restore`` gives the outputs their own classes
        back."""
        if dataclasses.is_dataclass(a) and not isinstance(a, (type, dict)):
            outputs.register_dataclass(type(a))
            return super().create_arg(pytree.tree_leaves(a))
        return super().create_arg(a)

    def iter(self, obj):
        """Iterating the result of split/chunk/unbind with a known count (``list(x.split((a, b), 1))``)."""
        n = _split_count(obj.node)
        if n is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(n)])

    def call_module(self, m, forward, args, kwargs):
        try:
            qualname = self.path_of_module(m)
        except NameError:  # not a registered submodule: let fx inline it as it always does
            return super().call_module(m, forward, args, kwargs)
        self.depth += 1
        try:
            return super().call_module(m, forward, args, kwargs)
        except _SubmoduleUntraceable:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure inside a submodule's forward makes it a leaf candidate
            if self.is_leaf_module(m, qualname):
                raise
            raise _SubmoduleUntraceable(qualname, m, exc) from exc
        finally:
            self.depth -= 1


class _Proxy(torch.fx.Proxy):
    """A Proxy whose ``len`` is known for split/chunk results, so ``list(x.split(...))`` traces, and whose ``int()``
    and index are the example's value where it depends on input shapes only (``ShapeBranches.to_number``)."""

    def __len__(self) -> int:
        n = _split_count(self.node)
        return n if n is not None else super().__len__()

    def __int__(self) -> int:
        return self.tracer.to_int(self)

    def __index__(self) -> int:
        """A traced number as an index of something real: a slice of a buffer (``self.position_ids[:, :n]``), a
        list, ``range``; the example's value where it depends on input shapes only (asserted in the graph)."""
        return self.tracer.to_number(self, "an index", integral=True)

    def __setitem__(self, key: Any, value: Any) -> None:
        """``x[key] = value`` on a traced tensor: an ``operator.setitem`` node, which fx keeps as a side effect
        (timm ConViT's and MViTv2's relative positions)."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


def _split_count(node: torch.fx.Node) -> int | None:
    """How many tensors a split/chunk call returns when its arguments say so without knowing shapes."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or \
            name not in ("split", "split_with_sizes", "chunk", "tensor_split"):
        return None
    keys = ("split_size_or_sections", "split_sizes", "chunks")
    sizes = next((node.kwargs[k] for k in keys if k in node.kwargs), None)
    arg = node.args[1] if len(node.args) > 1 else sizes
    if isinstance(arg, (tuple, list)):
        return len(arg) + (1 if name == "tensor_split" else 0)
    if name == "chunk" and isinstance(arg, int):
        return arg
    return None


def normalize_inputs(example_inputs: Any, what: str = "example_inputs") -> tuple:
    """A tuple of tensors from a tensor, a tuple/list of tensors or a dict of them by argument name (the forward's
    keyword arguments, in the order the compiled module takes them); anything else is an InputError."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, dict) and example_inputs:
        bad = [k for k, v in example_inputs.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise InputError(f"{what} as a dict maps argument names to tensors; {bad[0]!r} does not.")
        return tuple(example_inputs.values())
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        leaves = pytree.tree_leaves(tuple(example_inputs))
        if all(isinstance(t, torch.Tensor) for t in leaves):
            nested = next((i for i, t in enumerate(example_inputs) if not isinstance(t, torch.Tensor)), None)
            if nested is None:
                return tuple(example_inputs)
            error = TopLevelUntraceable if what == "example_inputs" else InputError
            raise error(f"{what}: argument {nested} is a {type(example_inputs[nested]).__name__} of tensors; a "
                        f"graph takes tensors (a model taking containers is compiled piece by piece)")
        bad = next(type(t).__name__ for t in leaves if not isinstance(t, torch.Tensor))
        raise InputError(f"{what} must hold tensors only; found a {bad}. Pass non-tensor arguments through concrete_args.")
    raise InputError(
        f"{what} must be a tensor, a non-empty tuple of tensors or a dict of them by argument name, got "
        f"{type(example_inputs).__name__}. "
        f"Example: fxc.compile(model, (torch.randn(1, 3, 224, 224),), recipe)."
    )


def _describe_cause(exc: BaseException) -> str:
    frame = user_frame_from_exception(exc)
    where = f" at {frame[0]}:{frame[1]} in {frame[2]}: `{frame[3]}`" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _top_level_error(model: torch.nn.Module, exc: BaseException) -> TracingError:
    name = type(model).__name__
    frame = user_frame_from_exception(exc)
    where = f"\n  at {frame[0]}:{frame[1]} in {frame[2]}: `{frame[3]}`" if frame else ""
    return TracingError(
        f"cannot trace {name}.forward: {type(exc).__name__}: {exc}{where}\n"
        f"  hint: the top-level forward of {name} depends on tensor values or Python-side state. Either pass "
        f"concrete_args={{...}} to fix the arguments that choose the branch, or move the data-dependent part into "
        f"a submodule and name it in leaf_modules=[...] so it is kept opaque."
    )


def trace(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    eval_mode: bool = False,
    share_tensors: bool = False,
) -> torch.fx.GraphModule:
    """Trace a deep copy of ``model`` into a GraphModule with ``meta.TENSOR`` on every node.

    ``leaf_modules`` names submodules (qualified names or classes) to keep opaque.  ``eval_mode`` puts the copy in
    eval mode before tracing (branches on ``self.training`` are fixed at trace time); otherwise every submodule
    keeps the training flag it has.  The graph is checked against the copied model on ``example_inputs``: a trace
    that computes something else is a ``TracingError``.  A built-in module given as the whole model (an
    ``nn.MultiheadAttention``, say) becomes a single ``call_module`` node.  ``share_tensors``: the copy borrows the
    model's parameters and buffers instead of copying them (the pass manager copies them before a pass writes).
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    inputs = normalize_inputs(example_inputs)
    keywords = tuple(example_inputs) if isinstance(example_inputs, dict) else None
    check_model(model, inputs, concrete_args, keywords)
    start = time.perf_counter()
    try:
        root = copy_tree(model, share_tensors)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"cannot copy {type(model).__name__} (copying failed: {exc}); fxcompress works on a copy so that "
            f"your model is never modified. Make the module deep-copyable (no open files, locks or generators)."
        ) from exc
    if eval_mode:
        root.eval()

    names = {leaf for leaf in leaf_modules if isinstance(leaf, str)}
    types = tuple(leaf for leaf in leaf_modules if isinstance(leaf, type))
    known = dict(root.named_modules())
    for leaf in names:
        if leaf not in known:
            raise InputError(unknown_name_message("submodule", leaf, [k for k in known if k]))
    leaves = set(names)
    auto: dict[str, str] = {}
    shaped = bool(names or types or concrete_args)  # the user shaped symbolic tracing: torch.export cannot take over
    if keywords is not None and not _leading_positional(model, keywords):
        if shaped:
            raise InputError(f"example_inputs name {', '.join(keywords)}, which are not the leading positional "
                             f"arguments of {type(model).__name__}.forward: symbolic tracing (which leaf_modules= and "
                             f"concrete_args= shape) cannot take them; give them in the forward's order.")
        return _exported(model, root, inputs, start, None, keywords)
    if _Tracer(leaves, types).is_leaf_module(root, ""):
        holder, graph = _wrap_leaf_root(root, len(inputs))
        return _finish(model, holder, graph, root, inputs, names, auto, start)
    fixed = {**_defaults_not_given(root, len(inputs)), **(concrete_args or {})}
    examples = None  # the concrete run, once a submodule branches on a traced value (it may be a shape)
    for _ in range(len(known) + 2):
        tracer = _Tracer(leaves, types, examples)
        try:
            with _watch_autograd_functions(tracer), _state_kept(root), \
                    torch.no_grad() if examples else contextlib.nullcontext():
                graph = tracer.trace(root, concrete_args=fixed or None)
            break
        except _SubmoduleUntraceable as failure:
            if examples is None and (isinstance(failure.cause, ShapeValueNeeded) or isinstance(
                    failure.cause, torch.fx.proxy.TraceError) and "control flow" in str(failure.cause)):
                examples = inputs
                continue
            reason = _describe_cause(failure.cause)
            log.warning("submodule %r (%s) cannot be traced, kept as a leaf: %s",
                        failure.qualname, type(failure.module).__name__, reason)
            auto[failure.qualname] = reason
            leaves.add(failure.qualname)
        except Exception as exc:  # noqa: BLE001
            error = _top_level_error(model, exc)
            if shaped:
                raise error from exc
            return _exported(model, root, inputs, start, error, keywords)
    else:  # pragma: no cover - each retry adds a new leaf, so this needs more retries than modules
        raise TracingError(f"cannot trace {type(model).__name__}: retried with every submodule as a leaf.")

    gm = _finish(model, root, graph, root, inputs, names, auto, start, tuple(tracer.inlined))
    if tracer.branches:
        log.info("%s: branches on input shapes taken as the example inputs take them: %s", type(model).__name__,
                 "; ".join(tracer.branches))
        gm.meta[meta.TRACE_INFO] = dataclasses.replace(gm.meta[meta.TRACE_INFO], shape_branches=tuple(tracer.branches))
    return gm


def _exported(model: torch.nn.Module, root: torch.nn.Module, inputs: tuple, start: float,
              fx_error: TracingError | None, keywords: tuple[str, ...] | None) -> torch.fx.GraphModule:
    """The graph of the second front end (``capture``: torch.export, normalised) over ``root`` (the copy symbolic
    tracing was given, in its training mode) for a model symbolic tracing cannot trace (``fx_error``) or cannot call
    (inputs by keyword); when torch.export fails too, the symbolic tracing error, with export's reason added."""
    why = str(fx_error) if fx_error is not None else f"inputs by keyword ({', '.join(keywords or ())})"
    inlined: list[str] = []
    try:
        with _record_autograd_functions(inlined):
            graph = capture.export_graph(root, inputs, keywords)
    except Exception as exc:  # noqa: BLE001
        if fx_error is None:
            raise TracingError(f"cannot capture {type(model).__name__} with torch.export: "
                               f"{_describe_cause(exc)}") from exc
        raise TopLevelUntraceable(f"{fx_error}\n  torch.export could not capture it either: "
                                  f"{_describe_cause(exc)}") from exc
    log.info("%s: captured with torch.export (symbolic tracing: %s)", type(model).__name__, why)
    dynamic = tuple(tuple(d for d, size in enumerate(getattr(n.meta.get("val"), "shape", ()))
                          if not isinstance(size, int)) for n in graph.nodes if n.op == "placeholder")
    gm = _finish(model, root, graph, root, inputs, set(), {}, start, tuple(dict.fromkeys(inlined)), keywords)
    info = gm.meta[meta.TRACE_INFO]
    gm.meta[meta.TRACE_INFO] = dataclasses.replace(info, front_end="export", fx_failure=why, dynamic_dims=dynamic)
    return gm


def _leading_positional(model: torch.nn.Module, keywords: tuple[str, ...]) -> bool:
    """Whether the keywords are the forward's first positional parameters, in order (then calling by position is
    the same call)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return tuple(positional[:len(keywords)]) == keywords


def _defaults_not_given(root: torch.nn.Module, n_inputs: int) -> dict[str, Any]:
    """The forward's arguments after the ``n_inputs`` given ones whose default is None: traced as the caller calls
    the model, with None (``if mask is not None:`` would otherwise take the branch of a mask nobody gave)."""
    try:
        params = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {p.name: None for p in positional[n_inputs:] if p.default is None}


def check_model(model: torch.nn.Module, inputs: tuple, concrete_args: dict[str, Any] | None = None,
                keywords: tuple[str, ...] | None = None) -> None:
    """What fxcompress cannot compile, said before it is tried: wrappers (torch.compile, TorchScript), weights
    without values (meta) or off the CPU, dtypes other than float32, forwards that take no positional inputs,
    concrete_args naming no argument."""
    name = type(model).__name__
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        raise InputError(f"{name} is the wrapper torch.compile returns; fxcompress traces the module itself: pass "
                         f"model._orig_mod (and torch.compile the compressed result if you like).")
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(f"{name} is a TorchScript module, which torch.fx cannot trace; pass the original "
                         f"nn.Module it was scripted from.")
    for what, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for key, t in tensors:
            if t.is_meta:
                raise InputError(f"{what} {key!r} of {name} is on the meta device (it has no values); load the "
                                 f"weights first (model.to_empty(device='cpu') and load_state_dict).")
            if t.device.type != "cpu":
                raise InputError(f"{what} {key!r} of {name} is on {t.device}; fxcompress compiles on the CPU: "
                                 f"pass model.cpu() (and CPU example inputs).")
            if t.is_floating_point() and t.dtype not in FLOAT_DTYPES:
                raise InputError(f"{what} {key!r} of {name} is {t.dtype}; fxcompress compiles float32 (or float64) "
                                 f"models, whose passes are checked at that precision: pass model.float() and "
                                 f"float32 example inputs.")
    dtypes = {t.dtype for t in [*model.parameters(), *model.buffers(), *inputs] if t.is_floating_point()}
    if len(dtypes) > 1:
        raise InputError(f"{name} mixes floating-point dtypes ({', '.join(sorted(map(str, dtypes)))} among its "
                         f"parameters, buffers and example inputs); pass model.float() and float32 inputs.")
    for i, t in enumerate(inputs):
        if t.device.type != "cpu":
            raise InputError(f"example input {i} is on {t.device}; pass CPU tensors (x.cpu()).")
        if t.is_floating_point() and t.dtype not in FLOAT_DTYPES:
            raise InputError(f"example input {i} is {t.dtype}; fxcompress compiles float32 models: pass x.float() "
                             f"(and model.float()).")
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_kw = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    names = [p.name for p in params]
    if keywords is not None:
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
        unknown = [k for k in keywords if k not in names and not takes_any]
        if unknown:
            raise InputError(f"example_inputs names {unknown[0]!r}, which {name}.forward does not take."
                             f"{did_you_mean(unknown[0], names)} Its arguments: {', '.join(names) or '(none)'}.")
    elif required_kw and not any(p.kind is p.VAR_POSITIONAL for p in params) and len(positional) < len(inputs):
        raise InputError(f"{name}.forward takes {', '.join(required_kw)} as keyword-only arguments; fxcompress calls "
                         f"forward with the example inputs by position. Give them by name instead (example_inputs="
                         f"{{{required_kw[0]!r}: tensor, ...}}).")
    if concrete_args:
        for key in concrete_args:
            if key not in names:
                raise InputError(f"concrete_args names {key!r}, which {name}.forward does not take."
                                 f"{did_you_mean(key, names)} Its arguments: {', '.join(names) or '(none)'}.")


def wrap_root(module: torch.nn.Module, n_inputs: int, class_name: str) -> CompiledModule:
    """A compiled module whose graph calls ``module`` as one opaque node (a model compiled piece by piece)."""
    holder, graph = _wrap_leaf_root(module, n_inputs)
    return CompiledModule(holder, graph, class_name=class_name)


def _wrap_leaf_root(module: torch.nn.Module, n_inputs: int) -> tuple[torch.nn.Module, torch.fx.Graph]:
    """A graph calling a built-in leaf module (nn.MultiheadAttention, nn.Conv2d, ...) given as the whole model.

    fx always traces into the root; a built-in module as the model becomes one ``call_module`` node instead, as it
    would be inside any other model, so every rule keyed by module class applies to it.
    """
    holder = torch.nn.Module()
    holder.add_module("module", module)
    holder.training = module.training
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    graph = torch.fx.Graph()
    args = [graph.placeholder(params[i].name if i < len(params) else f"input_{i}") for i in range(n_inputs)]
    graph.output(graph.call_module("module", tuple(args)))
    return holder, graph


def _finish(model, root, graph, reference, inputs, names, auto, start, inlined=(),
            keywords=None) -> torch.fx.GraphModule:
    """The GraphModule over ``root``'s (copied) submodules, checked against ``reference`` on the inputs."""
    gm = CompiledModule(root, graph, class_name=type(model).__name__)
    # GraphModule makes fresh containers for intermediate paths (training=True); copy every flag by name.
    source = dict(root.named_modules())
    for name, module in gm.named_modules():
        module.training = source[name].training if name in source else reference.training
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in auto:
            node.meta[meta.AUTO_LEAF] = auto[node.target]
    copied = _check_against_model(reference, gm, inputs, keywords)
    info = TraceInfo(time.perf_counter() - start, len(gm.graph.nodes), tuple(sorted(names)), auto, tuple(inlined),
                     copied)
    gm.meta[meta.TRACE_INFO] = info
    return gm


def _copy_modified_inputs(gm: torch.fx.GraphModule, probe: tuple, versions: list[int]) -> tuple[str, ...]:
    """Make the graph copy every input its forward modified in place (``x.mul_(2)``) in a run on ``probe`` (whose
    tensors had ``versions`` before), so that running the compiled module never writes to the caller's tensors;
    returns the names of those inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    changed = [p for p, t, v in zip(placeholders, probe, versions) if t._version != v]
    for p in changed:
        with gm.graph.inserting_after(p):
            copy_node = gm.graph.call_method("clone", (p,))
        p.replace_all_uses_with(copy_node, delete_user_cb=lambda user: user is not copy_node)
    if changed:
        gm.recompile()
    return tuple(p.target for p in changed)


def run_example(module: torch.nn.Module, inputs: Sequence[torch.Tensor], what: str,
                keywords: Sequence[str] | None = None) -> Any:
    inputs = tuple(t.clone() for t in inputs)  # a forward may modify its inputs in place: never the caller's
    try:
        with meta.side_effect_free(module):
            return module(**dict(zip(keywords, inputs))) if keywords else module(*inputs)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"{what} fails on the example inputs ({', '.join(str(meta.describe(t)) for t in inputs)}): "
            f"{_describe_cause(exc)}. Check that example_inputs match the forward's arguments."
        ) from exc


def _check_against_model(root: torch.nn.Module, gm: torch.fx.GraphModule, inputs: tuple,
                         keywords: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Compare the graph with the model on the inputs; returns the inputs the graph now copies because the forward
    writes to them (``_copy_modified_inputs``)."""
    expected = run_example(root, inputs, type(root).__name__, keywords)
    probe = tuple(t.clone() for t in inputs)
    versions = [t._version for t in probe]
    try:
        got = meta.propagate(gm, probe)
        copied = _copy_modified_inputs(gm, probe, versions)
        if copied:
            got = meta.propagate(gm, tuple(t.clone() for t in inputs))
    except Exception as exc:  # noqa: BLE001
        raise TracingError(f"the traced graph of {type(root).__name__} fails on the example inputs: "
                           f"{_describe_cause(exc)}") from exc
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    got_leaves, got_spec = pytree.tree_flatten(got)
    unknown = outputs.unknown_container(expected)
    if exp_spec != got_spec and unknown is None and outputs.restore(gm, exp_spec, got):
        got_leaves, got_spec = pytree.tree_flatten(meta.propagate(gm, tuple(t.clone() for t in inputs)))
    if exp_spec != got_spec and unknown is not None:
        raise TracingError(f"{type(root).__name__} returns a {unknown.__module__}.{unknown.__qualname__}, a container "
                           f"torch's pytree does not know, so its contents cannot be traced back into it: register "
                           f"the class (torch.utils._pytree.register_pytree_node(cls, flatten, unflatten, "
                           f"serialized_type_name=...)) or return a dict, tuple or dataclass.")
    if exp_spec != got_spec:
        raise TracingError(f"the traced graph of {type(root).__name__} returns {got_spec}, the model {exp_spec}; "
                           f"the forward has Python-side behaviour tracing cannot see. Use concrete_args.")
    for i, (e, g) in enumerate(zip(exp_leaves, got_leaves)):
        if isinstance(e, torch.Tensor) and not (e.shape == g.shape and torch.allclose(e, g, rtol=1e-5, atol=1e-6, equal_nan=True)):
            raise TracingError(
                f"the traced graph of {type(root).__name__} computes a different output #{i} than the model "
                f"(the forward depends on state tracing cannot see, such as self.training or a Python counter). "
                f"Keep the offending submodule opaque with leaf_modules=[...] or fix the branch with concrete_args."
            )
    return copied
