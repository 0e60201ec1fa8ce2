"""Compiled modules that save and load: the architecture travels in the ``state_dict``, as plain data.

    result.save("model.pt")            # = torch.save(result.module.state_dict(), "model.pt")
    module = fxc.load("model.pt")      # torch.load(weights_only=True), then the module rebuilt from plain data

A compiled module is a ``CompiledModule`` (a ``torch.fx.GraphModule``).  Its ``state_dict`` holds, beside the
parameters and buffers, two more entries, both tensors so that ``{k: v.clone() ...}`` and ``.to(device)`` work:

- ``_fxc_architecture``: the UTF-8 bytes (uint8) of a JSON document: the module tree (class, plain attributes,
  parameter and buffer names, tied parameters, training flags) and the graph (op, target, arguments of every node);
- ``_fxc_tensor_<n>``: tensors the architecture needs that are not parameters or persistent buffers (graph
  constants, non-persistent buffers, tensors held by an observer's calibrator).

``fxc.load`` reads the file with ``torch.load(weights_only=True)``, so no pickled code runs, and rebuilds the module
from the JSON through allow lists: module classes from ``torch.nn`` and ``fxcompress``, graph functions that are
PyTorch tensor operations (``torch.overrides``), ``operator``, ``math`` and fxcompress's own; Tensor method names
without a leading underscore.  Anything else (a model's own leaf module or wrapped function) is refused by name
unless the caller passes it in ``allow=``.  Loading a ``state_dict`` into a module compiled with the same recipe
checks that the two graphs are the same.

``torch.save(result.module)`` pickles the same payload (``CompiledModule.__reduce__``); ``torch.load(...,
weights_only=False)`` rebuilds it trusting every name (the caller chose to run pickled code).
"""
from __future__ import annotations

import builtins
import dataclasses
import functools
import importlib
import inspect
import json
import logging
import math
import operator
import os
import weakref
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx
import torch.nn as nn
from torch.fx.node import _get_qualified_name

from . import modules, ops, outputs
from .errors import InputError, SaveError

log = logging.getLogger(__name__)

FORMAT = "fxcompress.module"
VERSION = 1
ARCH_KEY = "_fxc_architecture"
TENSOR_PREFIX = "_fxc_tensor_"

_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # _parameters, _buffers, _modules, hooks, training
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_TRUSTED_PREFIXES = ("torch.nn.", "torch.fx.", "fxcompress.")
_SAFE_BUILTINS = (getattr, len, int, float, bool, min, max, abs, range, slice, tuple, list, dict, isinstance)
_CREATION = ("zeros", "ones", "full", "empty", "arange", "range", "eye", "linspace", "logspace", "tensor",
             "as_tensor", "scalar_tensor", "rand", "randn", "randint", "randperm", "_assert")
_DUNDER_METHODS = frozenset(f"__{n}__" for n in (
    "getitem", "setitem", "add", "radd", "iadd", "sub", "rsub", "isub", "mul", "rmul", "imul", "truediv", "rtruediv",
    "itruediv", "floordiv", "rfloordiv", "mod", "rmod", "pow", "rpow", "matmul", "rmatmul", "and", "or", "xor", "neg",
    "pos", "abs", "invert", "lt", "le", "gt", "ge", "eq", "ne", "lshift", "rshift", "len", "contains"))


class ArchitectureMismatch(InputError, RuntimeError):
    """``load_state_dict`` of a state_dict from another compiled architecture (a RuntimeError, as torch raises for
    a state_dict that does not fit)."""


# ----------------------------------------------------------------------------------------------- allow lists
@functools.cache
def _allowed_functions() -> dict[str, Any]:
    """Graph functions a file may name, by qualified name: PyTorch tensor ops, operator, math, a few builtins and
    fxcompress's own graph functions."""
    found: list[Any] = []
    for group in torch.overrides.get_overridable_functions().values():
        found.extend(f for f in group if callable(f) and not isinstance(f, type))
    found.extend(getattr(torch, n) for n in _CREATION if hasattr(torch, n))
    found.extend(getattr(operator, n) for n in dir(operator) if not n.startswith("_"))
    found.extend(getattr(math, n) for n in dir(math) if callable(getattr(math, n)) and not n.startswith("_"))
    found.extend(_SAFE_BUILTINS)
    found.extend(modules.GRAPH_FUNCTIONS)
    out = {}
    for f in found:
        try:
            out.setdefault(_get_qualified_name(f), f)
        except Exception:  # noqa: BLE001 - a name fx cannot form is one no graph uses
            continue
    return out


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _import_name(name: str) -> Any:
    """The object a qualified name denotes, importing its module (trusted use only)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    return getattr(builtins, name)


class _Resolver:
    """Turns names in a file back into classes and functions, through the allow lists unless ``trusted``."""

    def __init__(self, allow: Iterable[Any] = (), trusted: bool = False):
        self.trusted = trusted
        self.extra: dict[str, Any] = {}
        for obj in allow:
            if not (isinstance(obj, type) or callable(obj)):
                raise InputError(f"fxc.load: allow= takes classes and functions, got {obj!r}.")
            self.extra[_qualname(obj) if isinstance(obj, type) else _get_qualified_name(obj)] = obj

    def cls(self, name: str, where: str) -> type:
        if name in self.extra:
            return self.extra[name]
        if self.trusted or name.startswith(_TRUSTED_PREFIXES):
            try:
                obj = _import_name(name)
            except (ImportError, AttributeError) as exc:
                raise InputError(f"fxc.load: {where} names class {name!r}, which cannot be imported ({exc}).") \
                    from None
            if isinstance(obj, type):
                return obj
        raise InputError(f"fxc.load: {where} is of class {name!r}, which fxc.load does not import from a file on "
                         f"its own. If you trust the file, pass it: fxc.load(path, allow=[{name.rsplit('.', 1)[-1]}]).")

    def fn(self, name: str, where: str) -> Any:
        if name in self.extra:
            return self.extra[name]
        allowed = _allowed_functions()
        if name in allowed:
            return allowed[name]
        if self.trusted:
            return _import_name(name)
        known = ops.library_function(name)  # torchvision's and timm's functions that the op registry names
        if known is not None:
            return known
        raise InputError(f"fxc.load: {where} calls {name!r}, which is not a PyTorch tensor operation or one of "
                         f"fxcompress's. If you trust the file, pass the function: fxc.load(path, allow=[fn]).")


# ----------------------------------------------------------------------------------------------- encoding
class _Encoder:
    """Plain-data description of a GraphModule; tensors that are not in the state_dict go to ``tensors``."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.tensors: dict[str, torch.Tensor] = {}
        self._tensor_ids: dict[int, str] = {}
        self._seen_modules: dict[int, str] = {}
        self._seen_params: dict[int, str] = {}
        self._own: dict[int, str] = {}  # the parameters of the module being described, by id

    def tensor(self, t: torch.Tensor) -> dict:
        key = self._tensor_ids.get(id(t))
        if key is None:
            key = self._tensor_ids[id(t)] = str(len(self.tensors))
            self.tensors[key] = t.detach()
        return {"~tensor": key}

    def value(self, v: Any, where: str) -> Any:
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"~float": repr(v)}
        if isinstance(v, torch.fx.Node):
            return {"~node": v.name}
        if isinstance(v, nn.Parameter) and id(v) in self._own:  # a module's own parameter held in a list (RNN)
            return {"~param": self._own[id(v)]}
        if isinstance(v, weakref.ReferenceType) and id(v()) in self._own:
            return {"~param_ref": self._own[id(v())]}
        if isinstance(v, torch.Size):
            return {"~size": list(v)}
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            raise SaveError(f"{where}: a namedtuple ({type(v).__name__}) cannot be saved portably.")
        if isinstance(v, tuple):
            return {"~tuple": [self.value(x, where) for x in v]}
        if isinstance(v, list):
            return [self.value(x, where) for x in v]
        if isinstance(v, (set, frozenset)):
            return {"~set": [self.value(x, where) for x in sorted(v, key=repr)]}
        if isinstance(v, dict):
            return {"~dict": [[self.value(k, where), self.value(x, where)] for k, x in v.items()]}
        if isinstance(v, torch.dtype):
            return {"~dtype": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"~device": str(v)}
        if isinstance(v, torch.memory_format):
            return {"~memory_format": str(v).removeprefix("torch.")}
        if isinstance(v, torch.layout):
            return {"~layout": str(v).removeprefix("torch.")}
        if isinstance(v, slice):
            return {"~slice": [self.value(v.start, where), self.value(v.stop, where), self.value(v.step, where)]}
        if v is Ellipsis:
            return {"~ellipsis": True}
        if isinstance(v, complex):
            return {"~complex": [v.real, v.imag]}
        if isinstance(v, torch.Tensor):
            return self.tensor(v)
        if isinstance(v, type):
            return {"~class": _qualname(v)}
        if inspect.isroutine(v):
            try:
                return {"~fn": _get_qualified_name(v)}
            except Exception:  # noqa: BLE001 - reported below
                pass
        elif dataclasses.is_dataclass(v) or (type(v).__module__.startswith("fxcompress.") and hasattr(v, "__dict__")):
            state = {k: self.value(x, f"{where}.{k}") for k, x in vars(v).items()}
            return {"~object": _qualname(type(v)), "state": state}
        raise SaveError(f"{where} is a {type(v).__name__} ({v!r:.60}), which the portable format cannot describe. "
                        f"Use torch.save(result.module) (a pickle) instead, or keep such values out of the model.")

    def module(self, m: nn.Module, path: str) -> dict:
        where = f"module {path or '(root)'!r}"
        if id(m) in self._seen_modules:
            return {"~module": self._seen_modules[id(m)]}
        self._seen_modules[id(m)] = path
        hooks = [h for h in _HOOKS if getattr(m, h, None)]
        if hooks:
            raise SaveError(f"{where} has {', '.join(hooks)} registered, which cannot be saved; remove the hooks "
                            f"before saving.")
        record: dict[str, Any] = {"class": _qualname(type(m)), "training": m.training}
        self._own = {id(p): name for name, p in m._parameters.items() if p is not None}
        if isinstance(m, torch.fx.GraphModule):
            record["class"] = "torch.fx.GraphModule" if path else record["class"]
            attrs = {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}
            record["graph"] = self.graph(m.graph, where)
        else:
            attrs = {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS}
        record["attrs"] = {k: self.value(v, f"{where}, attribute {k!r}") for k, v in attrs.items()}
        prefix = f"{path}." if path else ""
        params = {}
        for name, p in m._parameters.items():
            if p is None:
                params[name] = None
            elif id(p) in self._seen_params:
                params[name] = {"tied": self._seen_params[id(p)], "requires_grad": p.requires_grad}
            else:
                self._seen_params[id(p)] = prefix + name
                params[name] = {"requires_grad": p.requires_grad}
        record["params"] = params
        buffers = {}
        for name, b in m._buffers.items():
            persistent = name not in m._non_persistent_buffers_set
            if b is None:
                buffers[name] = None
            elif persistent:
                buffers[name] = {"persistent": True}
            else:
                buffers[name] = {"persistent": False, "value": self.tensor(b)}
        record["buffers"] = buffers
        record["children"] = {name: (None if c is None else self.module(c, prefix + name))
                              for name, c in m._modules.items()}
        return record

    def graph(self, graph: torch.fx.Graph, where: str) -> dict:
        nodes = []
        for n in graph.nodes:
            here = f"{where}, node {n.name!r}"
            target = {"~fn": _get_qualified_name(n.target)} if n.op == "call_function" else n.target
            nodes.append([n.name, n.op, target, self.value(n.args, here), self.value(n.kwargs, here)])
        out: dict[str, Any] = {"nodes": nodes}
        codegen = graph._codegen
        if isinstance(codegen, torch.fx.graph._PyTreeCodeGen):
            info = codegen.pytree_info
            spec = torch.utils._pytree.treespec_dumps
            specs = [t for t in (info.in_spec, info.out_spec) if t is not None]
            classes = [outputs.record(cls, where) for cls in outputs.spec_classes(specs)]  # first: makes them dumpable
            out["pytree"] = {"orig_args": list(info.orig_args),
                             "in_spec": spec(info.in_spec) if info.in_spec is not None else None,
                             "out_spec": spec(info.out_spec) if info.out_spec is not None else None,
                             "classes": classes}
        elif type(codegen) is not torch.fx.graph.CodeGen:
            raise SaveError(f"{where}: the graph's code generator {type(codegen).__name__} cannot be saved.")
        return out


def describe(gm: torch.fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the JSON-able architecture of ``gm``, the tensors it needs beyond the state_dict)."""
    enc = _Encoder(gm)
    arch = {"format": FORMAT, "version": VERSION, "class_name": type(gm).__name__, "root": enc.module(gm, "")}
    return arch, enc.tensors


def _to_bytes(arch: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(arch, separators=(",", ":")).encode()), dtype=torch.uint8)


def _from_bytes(t: torch.Tensor) -> dict:
    try:
        arch = json.loads(bytes(t.to(torch.uint8).numpy().tobytes()).decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"fxc.load: the architecture entry {ARCH_KEY!r} is damaged ({exc}).") from None
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise InputError(f"fxc.load: {ARCH_KEY!r} is not an fxcompress architecture.")
    if arch.get("version") != VERSION:
        raise InputError(f"fxc.load: the file was written by format version {arch.get('version')}; this fxcompress "
                         f"reads version {VERSION}. Load it with the fxcompress that wrote it.")
    return arch


# ----------------------------------------------------------------------------------------------- decoding
class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor], resolver: _Resolver):
        self.tensors, self.state, self.resolve = tensors, state, resolver
        self.modules: dict[str, nn.Module] = {}
        self.params: dict[str, nn.Parameter] = {}
        self._own: nn.Module | None = None  # the module whose attributes are being decoded

    def value(self, v: Any, where: str, nodes: dict[str, torch.fx.Node] | None = None) -> Any:
        if isinstance(v, list):
            return [self.value(x, where, nodes) for x in v]
        if not isinstance(v, dict):
            return v
        (tag, body), *_ = v.items()
        rec = functools.partial(self.value, where=where, nodes=nodes)
        if tag == "~node":
            if nodes is None or body not in nodes:
                raise InputError(f"fxc.load: {where} refers to node {body!r} before it is defined.")
            return nodes[body]
        if tag == "~float":
            return float(body)
        if tag == "~tuple":
            return tuple(rec(x) for x in body)
        if tag == "~set":
            return {rec(x) for x in body}
        if tag == "~dict":
            return {rec(k): rec(x) for k, x in body}
        if tag == "~size":
            return torch.Size(body)
        if tag == "~dtype":
            return self._torch_attr(body, torch.dtype, where)
        if tag == "~memory_format":
            return self._torch_attr(body, torch.memory_format, where)
        if tag == "~layout":
            return self._torch_attr(body, torch.layout, where)
        if tag == "~device":
            return torch.device(body)
        if tag == "~slice":
            return slice(*(rec(x) for x in body))
        if tag == "~ellipsis":
            return Ellipsis
        if tag == "~complex":
            return complex(*body)
        if tag in ("~param", "~param_ref"):
            p = self._own._parameters.get(body) if self._own is not None else None
            if p is None:
                raise InputError(f"fxc.load: {where} refers to parameter {body!r}, which the module lacks.")
            return p if tag == "~param" else weakref.ref(p)
        if tag == "~tensor":
            if body not in self.tensors:
                raise InputError(f"fxc.load: {where} needs tensor {TENSOR_PREFIX}{body}, which the file lacks.")
            return self.tensors[body]
        if tag == "~class":
            return self.resolve.cls(body, where)
        if tag == "~fn":
            return self.resolve.fn(body, where)
        if tag == "~object":
            cls = self.resolve.cls(body, where)
            obj = cls.__new__(cls)
            obj.__dict__.update({k: rec(x) for k, x in v["state"].items()})
            return obj
        raise InputError(f"fxc.load: {where} holds an unknown entry {tag!r}; the file is damaged.")

    @staticmethod
    def _torch_attr(name: str, kind: type, where: str) -> Any:
        value = getattr(torch, name, None)
        if not isinstance(value, kind):
            raise InputError(f"fxc.load: {where} names {name!r}, which is not a torch {kind.__name__}.")
        return value

    def module(self, record: dict, path: str) -> nn.Module:
        where = f"module {path or '(root)'!r}"
        if "~module" in record:
            return self.modules[record["~module"]]
        name = record["class"]
        if "graph" in record:
            cls = self.resolve.cls(name, where) if path else CompiledModule
            m = cls(nn.Module(), torch.fx.Graph()) if issubclass(cls, torch.fx.GraphModule) else None
            if m is None:
                raise InputError(f"fxc.load: {where} has a graph but class {name!r} is not a GraphModule.")
        else:
            cls = self.resolve.cls(name, where)
            if not issubclass(cls, nn.Module):
                raise InputError(f"fxc.load: {where} names {name!r}, which is not a torch.nn.Module.")
            m = cls.__new__(cls)
            nn.Module.__init__(m)
        self.modules[path] = m
        prefix = f"{path}." if path else ""
        for pname, spec in record["params"].items():
            if spec is None:
                m._parameters[pname] = None
            elif "tied" in spec:
                m._parameters[pname] = self.params[spec["tied"]]
            else:
                p = nn.Parameter(self._state(prefix + pname), requires_grad=spec["requires_grad"])
                m._parameters[pname] = self.params[prefix + pname] = p
        for bname, spec in record["buffers"].items():
            if spec is None:
                m._buffers[bname] = None
            elif spec["persistent"]:
                m._buffers[bname] = self._state(prefix + bname)
            else:
                m._buffers[bname] = self.value(spec["value"], where)
                m._non_persistent_buffers_set.add(bname)
        self._own = m
        m.__dict__.update({k: self.value(v, f"{where}, attribute {k!r}") for k, v in record["attrs"].items()})
        for cname, child in record["children"].items():
            m._modules[cname] = None if child is None else self.module(child, prefix + cname)
        if "graph" in record:
            m.graph = self.graph(record["graph"], where)
        m.training = record["training"]
        return m

    def _state(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise InputError(f"fxc.load: the state_dict has no entry {key!r}, which the architecture needs; the "
                             f"file is incomplete.")
        return self.state[key]

    def graph(self, record: dict, where: str) -> torch.fx.Graph:
        graph = torch.fx.Graph()
        nodes: dict[str, torch.fx.Node] = {}
        for name, op, target, args, kwargs in record["nodes"]:
            here = f"{where}, node {name!r}"
            if op == "call_function":
                target = self.value(target, here)
                args = self.value(args, here, nodes)
                if target is getattr and not (len(args) >= 2 and isinstance(args[1], str)
                                              and not args[1].startswith("_")):
                    raise InputError(f"fxc.load: {here} reads a private attribute ({args[1:2]}); refused.")
            elif op == "call_method":
                if not (isinstance(target, str) and hasattr(torch.Tensor, target)
                        and (not target.startswith("_") or target in _DUNDER_METHODS)):
                    raise InputError(f"fxc.load: {here} calls method {target!r}, which is not a public Tensor "
                                     f"method; refused.")
                args = self.value(args, here, nodes)
            elif op in ("placeholder", "get_attr", "call_module", "output"):
                if not isinstance(target, str):
                    raise InputError(f"fxc.load: {here} has a bad target {target!r}; the file is damaged.")
                args = self.value(args, here, nodes)
            else:
                raise InputError(f"fxc.load: {here} has an unknown op {op!r}; the file is damaged.")
            kwargs = self.value(kwargs, here, nodes)
            nodes[name] = graph.create_node(op, target, tuple(args), dict(kwargs), name=name)
        if "pytree" in record:
            info = record["pytree"]
            for name, kind in info.get("classes", []):
                outputs.register(self.resolve.cls(name, f"{where}, output"), kind, where)
            load = torch.utils._pytree.treespec_loads
            if info["in_spec"] is None and info["out_spec"]:  # outputs rebuilt, the forward's own signature
                graph._codegen = outputs.codegen(info["orig_args"], load(info["out_spec"]))
            else:
                graph._codegen = torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(
                    info["orig_args"], load(info["in_spec"]) if info["in_spec"] else None,
                    load(info["out_spec"]) if info["out_spec"] else None))
        return graph


def build(state: dict[str, Any], allow: Iterable[Any] = (), trusted: bool = False) -> CompiledModule:
    """The module a ``CompiledModule.state_dict()`` describes (see the module docstring)."""
    if not isinstance(state, dict) or ARCH_KEY not in state:
        raise InputError(f"fxc.load: this is not a saved fxcompress module (no {ARCH_KEY!r} entry). Save with "
                         f"result.save(path) or torch.save(result.module.state_dict(), path).")
    arch = _from_bytes(state[ARCH_KEY])
    tensors = {k[len(TENSOR_PREFIX):]: v for k, v in state.items() if k.startswith(TENSOR_PREFIX)}
    decoder = _Decoder(tensors, state, _Resolver(allow, trusted))
    try:
        module = decoder.module(arch["root"], "")
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"fxc.load: the architecture is damaged ({type(exc).__name__}: {exc}).") from None
    module.__class__.__name__ = arch.get("class_name", "CompiledModule")
    module.recompile()
    return module


def load(path: str | os.PathLike, *, allow: Iterable[Any] = ()) -> CompiledModule:
    """The module saved at ``path`` by ``result.save`` or ``torch.save(result.module.state_dict())``.

    The file is read with ``torch.load(weights_only=True)``: no pickled code runs.  Classes and functions outside
    PyTorch and fxcompress are refused unless given in ``allow``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"fxc.load: {str(path)!r} is not a file.")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - pickle and zip errors alike: the file is not a safe state_dict
        first = (str(exc).strip().splitlines() or [""])[0]
        raise InputError(f"fxc.load: {str(path)!r} cannot be read as a weights-only file ({type(exc).__name__}: "
                         f"{first}). fxc.load never runs pickled code; if you wrote this file with "
                         f"torch.save(module) and trust it, use torch.load(path, weights_only=False).") from None
    return build(state, allow)


def _rebuild_trusted(state: dict[str, Any]) -> CompiledModule:
    """Unpickling entry of ``torch.save(compiled_module)`` (``torch.load(..., weights_only=False)``)."""
    return build(state, trusted=True)


class CompiledModule(torch.fx.GraphModule):
    """A GraphModule whose ``state_dict`` carries its architecture, so that it saves and loads (``fxc.load``)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        try:
            arch, tensors = describe(self)
        except Exception as exc:  # noqa: BLE001 - a state_dict never fails for want of the architecture
            log.warning("the state_dict of %s carries no architecture: %s", type(self).__name__, exc)
            return
        destination[prefix + ARCH_KEY] = _to_bytes(arch)
        for key, t in tensors.items():
            destination[prefix + TENSOR_PREFIX + key] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        theirs = state_dict.pop(prefix + ARCH_KEY, None)
        extra = {k[len(prefix + TENSOR_PREFIX):]: state_dict.pop(k) for k in list(state_dict)
                 if k.startswith(prefix + TENSOR_PREFIX)}
        if theirs is not None:
            try:
                mine, tensors = describe(self)
            except Exception:  # noqa: BLE001 - this module cannot describe itself (see _save_to_state_dict)
                mine, tensors = None, {}
            difference = _graph_difference(mine["root"], _from_bytes(theirs)["root"]) if mine else ""
            if difference:
                raise ArchitectureMismatch(f"the state_dict comes from another compiled architecture "
                                           f"({difference}); rebuild it with fxc.load(path) instead of loading it "
                                           f"into this module")
            with torch.no_grad():
                for key, t in tensors.items():
                    if key in extra and extra[key].shape == t.shape:
                        t.copy_(extra[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def save(self, path: str | os.PathLike) -> Path:
        return save(self, path)

    def __reduce__(self):
        return _rebuild_trusted, (dict(self.state_dict()),)


def _graph_difference(a: dict, b: dict, path: str = "") -> str:
    """Where two module records' graphs and module classes differ (empty when they agree)."""
    if a.get("class") != b.get("class"):
        return f"module {path or '(root)'!r} is {b.get('class')} there, {a.get('class')} here"
    if "graph" in a or "graph" in b:
        na, nb = a.get("graph", {}).get("nodes", []), b.get("graph", {}).get("nodes", [])
        for x, y in zip(na, nb):
            if x != y:
                return f"node {x[0]!r} is {_node_text(y)} there, {_node_text(x)} here"
        if len(na) != len(nb):
            return f"{len(nb)} nodes there, {len(na)} here"
    for name in sorted(set(a.get("children", {})) | set(b.get("children", {}))):
        ca, cb = a.get("children", {}).get(name), b.get("children", {}).get(name)
        if isinstance(ca, dict) and isinstance(cb, dict):
            sub = _graph_difference(ca, cb, f"{path}.{name}" if path else name)
            if sub:
                return sub
        elif (ca is None) != (cb is None):
            return f"submodule {name!r} exists on one side only"
    return ""


def _node_text(record: list) -> str:
    """``op target(args)`` of an encoded node, shortened: for messages."""
    _, op, target, args, _ = record
    name = target["~fn"] if isinstance(target, dict) else target
    text = f"{op} {name}{json.dumps(args, separators=(',', ':'))}"
    return text if len(text) <= 100 else text[:97] + "..."


def save(gm: torch.fx.GraphModule, path: str | os.PathLike) -> Path:
    """Write ``gm`` (its state_dict, with the architecture) to ``path``; ``fxc.load(path)`` rebuilds it."""
    gm = gm if isinstance(gm, CompiledModule) else None
    if gm is None:
        raise InputError("save: only compiled modules (result.module) carry their architecture.")
    describe(gm)  # raises SaveError naming what cannot be saved
    path = Path(path)
    if path.is_dir():
        raise InputError(f"save: {str(path)!r} is a directory; give the path of the file to write.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(gm.state_dict(), path)
    except OSError as exc:
        raise InputError(f"save: cannot write {str(path)!r}: {exc.strerror or exc}. Choose a writable path.") \
            from None
    return path
