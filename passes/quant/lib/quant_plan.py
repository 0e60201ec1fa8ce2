"""Where a model is quantized: the planner of ``insert_observers``, as data (a ``QuantPlan``), by placement roles.

Placement follows what ONNX Runtime fuses into integer kernels (QLinearConv, QLinearMatMul, QGemm,
MatMulIntegerToFloat):

- the activation inputs and the weights of Conv / ConvTranspose / Linear (modules, or ``F.conv*`` / ``F.linear``
  with a parameter weight) and both operands of ``matmul`` / ``bmm`` / ``mm`` are quantized;
- the output of a Conv / ConvTranspose is quantized too (QLinearConv has no float output), after the ReLU /
  ReLU6 that is its only user when there is one (ORT drops a ReLU in front of a uint8 quantize with zero point
  0); Linear and matmul outputs stay float unless a quantized op consumes them (QGemm and MatMulIntegerToFloat
  have float outputs);
- pass-through ops (max-pool, flatten, view/reshape, permute, squeeze, slices, dropout, identity, ``cat``)
  keep their input's grid: their output shares the input's scale, and ``cat`` makes all its inputs share one,
  so that no requantization appears between them;
- residual adds stay float (their inputs are not given scales of their own) unless ``quantize_add_inputs``;
- ``addmm(bias, x, W)`` with parameters ``bias`` and ``W`` (a Linear layer that stores its weight in x out, as
  Hugging Face's ``Conv1D`` in GPT-2 does) gets int8 weights in dynamic mode; in static mode it stays float;
- the table of an ``nn.Embedding`` (without ``max_norm``) is stored in int8 with a scale per row (per tensor without
  ``per_channel``), in both modes, as ONNX Runtime's ``quantize_dynamic`` stores it: a lookup reads int8 rows and
  dequantizes only those (``quantized_embedding``), and the file holds a quarter of the table's bytes; a table of
  fewer than ``SMALL_TABLE`` values (token types, relative-position biases) stays float.

A *site* is one set of tensors sharing a scale and zero point: the tensors where statistics are taken
(``values``) and the pass-through tensors that reuse them (``shared``).  Every use of a quantized tensor reads
its quantized value.  An op's role is the ``quant`` field of its record in ``fxcompress/ops.py``; ops without one
are float, and those with weights or MACs are named in the notes.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from fxcompress.passes.quant.lib.quant_spec import QuantSpec

from fxcompress import counting, meta, ops
from fxcompress.fxutil import arg
from fxcompress.options import matches
from fxcompress.plans import Artifact, Lifetime, data_class, graph_signature

ROLES = ("conv", "conv_transpose", "linear", "conv_function", "linear_function", "addmm", "matmul", "embedding",
         "relu", "hardtanh", "pass", "split", "cat", "add")
"""The placement roles an op's record in ``fxcompress/ops.py`` names in its ``quant`` field (what each does is
in the module docstring); an op with another role or none is left float."""
_LAYER_ROLES = ("conv", "conv_transpose", "linear", "embedding")  # modules lowered: only the classes themselves


def quant_role(gm: torch.fx.GraphModule, node: Any) -> str | None:
    """The placement role of the op ``node`` runs (None for a non-node or an op without one).  A subclass of a
    Conv/Linear class is not lowered as one (its ``forward`` may differ); other roles hold for subclasses."""
    if not isinstance(node, torch.fx.Node):
        return None
    role = ops.of_node(gm, node, "quant")
    if role in _LAYER_ROLES and node.op == "call_module" and ops.of_node(gm, node, "quant", exact=True) != role:
        return None
    return role


@data_class
@dataclasses.dataclass(frozen=True)
class Site:
    """Tensors quantized with one scale and zero point."""

    name: str
    spec: QuantSpec
    values: tuple[str, ...]  # node names whose outputs are observed
    shared: tuple[str, ...]  # pass-through node names quantized with the same parameters
    reason: str  # why it is quantized, e.g. "input of layer1.0.conv1"


@data_class
@dataclasses.dataclass(frozen=True)
class WeightSite:
    """A weighted op whose weight is quantized; ``kind`` in conv, conv_transpose, linear, addmm (a linear layer
    whose weight is stored in x out), matmul, embedding (weight only: its table)."""

    node: str
    kind: str
    weight: str  # target of the weight parameter
    bias: str | None  # target of the bias parameter
    spec: QuantSpec
    input_node: str | None  # the activation input node (its site gives the bias scale)
    operand: int = 1  # for matmul: which argument is the weight


@dataclasses.dataclass(frozen=True)
class QuantPlan(Artifact):
    """Where quantization goes, as data: the activation sites, the weights, and the ops left float with why."""

    kind = "quant_plan"
    owner = "insert_observers"
    lifetime = Lifetime.DECISION

    sites: dict[str, Site]
    weights: dict[str, WeightSite]  # op node name -> its weight
    float_ops: dict[str, str]  # node name -> why it stays float (ops with weights or MACs, unfolded BatchNorm)
    activation_bits: int
    weight_bits: int
    mode: str = "static"
    graph: str = ""  # graph_signature of the module it was made for

    def site_of(self, node_name: str) -> Site | None:
        for site in self.sites.values():
            if node_name in site.values or node_name in site.shared:
                return site
        return None

    def summary(self) -> dict[str, Any]:
        specs: dict[str, int] = {}
        for s in self.sites.values():
            specs[str(s.spec)] = specs.get(str(s.spec), 0) + 1
        return {"sites": len(self.sites), "observed_tensors": sum(len(s.values) for s in self.sites.values()),
                "shared_tensors": sum(len(s.shared) for s in self.sites.values()), "weights": len(self.weights),
                "float_ops": len(self.float_ops), "activation_specs": specs}


@dataclasses.dataclass(frozen=True)
class Options:
    activation_bits: int = 8
    weight_bits: int = 8
    method: str = "kl_tolerance"
    tolerance: float = 1.3
    percentile: float = 99.999
    bins: int = 2048
    per_channel: bool = True
    unsigned_after_relu: bool = True
    quantize_add_inputs: bool = False
    exclude: tuple[str, ...] = ()
    mode: str = "static"  # "dynamic": Linear weights only; activations are quantized per batch at run time


SMALL_TABLE = 65536  # embedding tables with fewer values stay float


def _module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _float_tensor(node: Any) -> bool:
    info = meta.tensor_info(node) if isinstance(node, torch.fx.Node) else None
    return info is not None and info.dtype.is_floating_point


def _param(gm: torch.fx.GraphModule, node: Any) -> str | None:
    """The target of a get_attr node holding a floating-point parameter or buffer, else None."""
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        try:
            value = gm.get_parameter(node.target)
        except AttributeError:
            try:
                value = gm.get_buffer(node.target)
            except AttributeError:
                return None
        return node.target if value.is_floating_point() else None
    return None


def is_relu(gm: torch.fx.GraphModule, node: Any) -> bool:
    """A ReLU / ReLU6, or a Hardtanh clamping at or above 0: its output is never negative."""
    role = quant_role(gm, node)
    return role == "relu" or (role == "hardtanh" and _module(gm, node).min_val >= 0)


class Planner:
    """Builds the QuantPlan of a traced, shape-annotated GraphModule."""

    def __init__(self, gm: torch.fx.GraphModule, options: Options):
        self.gm, self.o = gm, options
        self.parent: dict[str, str] = {}  # union-find over demanded value names
        self.reason: dict[str, str] = {}
        self.passthrough: set[str] = set()  # demanded values that only carry another value's grid
        self.weights: dict[str, WeightSite] = {}
        self.float_ops: dict[str, str] = {}
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self._links: list[tuple[str, str]] = []  # (pass-through value, its source): one site

    # union-find
    def _find(self, x: str) -> str:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def _union(self, a: str, b: str) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def _excluded(self, node: torch.fx.Node) -> bool:
        target = node.target if node.op == "call_module" else None
        if target is None and node.op == "call_function":
            w = arg(node, 1, "weight")
            target = w.target.rsplit(".", 1)[0] if isinstance(w, torch.fx.Node) and w.op == "get_attr" else None
        return target is not None and any(matches(target, p) for p in self.o.exclude)

    def demand(self, node: Any, reason: str) -> None:
        """``node``'s value must be quantized; a pass-through op hands the demand on to its inputs."""
        stack = [node]
        while stack:
            n = stack.pop()
            if not _float_tensor(n) or n.name in self.parent:
                continue
            self.parent[n.name], self.reason[n.name] = n.name, reason
            sources = self._passthrough_sources(n)
            if sources:
                self.passthrough.add(n.name)
                stack.extend(sources)
                self._links.extend((n.name, s.name) for s in sources)

    def _passthrough_sources(self, n: torch.fx.Node) -> list[torch.fx.Node]:
        gm = self.gm
        role = quant_role(gm, n)
        if n.op == "call_function" and role == "cat":
            tensors = arg(n, 0, "tensors")
            if isinstance(tensors, (list, tuple)) and all(_float_tensor(t) for t in tensors):
                return list(tensors)
            return []
        if n.op == "call_function" and n.target is operator.getitem:
            src = n.args[0]
            if _float_tensor(src):
                return [src]
            if quant_role(gm, src) == "split" and _float_tensor(src.args[0]):
                return [src.args[0]]
            return []
        if role == "pass":
            if n.op == "call_module" and getattr(_module(gm, n), "return_indices", False):
                return []
            if n.op == "call_function" and n.target in (F.max_pool1d, F.max_pool2d, F.max_pool3d) and \
                    arg(n, 6, "return_indices", False):
                return []
            first = n.args[0] if n.args else None
            return [first] if _float_tensor(first) else []
        return []

    def plan(self) -> QuantPlan:
        gm = self.gm
        for node in gm.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            handled = self._embedding(node) or self._weighted(node) or self._matmul(node) or self._add(node)
            if not handled:
                self._note_float(node)
        for a, b in self._links:
            self._union(a, b)
        return self._build()

    def _output_point(self, node: torch.fx.Node) -> torch.fx.Node:
        users = list(node.users)
        if len(users) == 1 and is_relu(self.gm, users[0]) and users[0].args and users[0].args[0] is node:
            return users[0]
        return node

    def _weighted(self, node: torch.fx.Node) -> bool:
        gm, o = self.gm, self.o
        m = _module(gm, node)
        role = quant_role(gm, node)
        if m is not None:
            if role not in _LAYER_ROLES:
                return False
            kind = role
            if len(node.args) != 1 or node.kwargs:
                self.float_ops[node.name] = f"{node.target}: called with extra arguments, left float"
                return True
            x, weight = node.args[0], f"{node.target}.weight"
            bias = f"{node.target}.bias" if m.bias is not None else None
            axis = 1 if kind == "conv_transpose" else 0
            if kind == "conv_transpose" and m.groups != 1:
                axis = None  # per-channel along the output axis needs one group
        elif role in ("conv_function", "linear_function"):
            kind = "linear" if role == "linear_function" else "conv"
            x, w, b = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
            weight, bias = _param(gm, w), _param(gm, b)
            if weight is None or (b is not None and bias is None):
                self.float_ops[node.name] = f"{node.name}: weight or bias is computed, not a parameter; left float"
                return True
            axis = 0
        elif role == "addmm":
            kind, axis = "addmm", 1
            b, x, w = arg(node, 0, "input"), arg(node, 1, "mat1"), arg(node, 2, "mat2")
            weight, bias = _param(gm, w), _param(gm, b)
            if o.mode != "dynamic":
                self.float_ops[node.name] = (f"{node.name}: static mode does not lower addmm (a weight stored in x "
                                             f"out); left float (mode='dynamic' quantizes it)")
                return True
            if weight is None or bias is None or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                self.float_ops[node.name] = f"{node.name}: not addmm(bias, x, weight) with parameters; left float"
                return True
        else:
            return False
        name = node.target if node.op == "call_module" else node.name
        if o.mode == "dynamic" and kind not in ("linear", "addmm"):
            self.float_ops[node.name] = (f"{name}: dynamic mode quantizes Linear layers only (ONNX Runtime's "
                                         f"dynamically quantized convolutions are slower than float)")
            return True
        if self._excluded(node):
            self.float_ops[node.name] = f"{name}: excluded"
            return True
        if not _float_tensor(x):
            self.float_ops[node.name] = f"{name}: input is not a floating-point tensor; left float"
            return True
        spec = QuantSpec(bits=o.weight_bits, signed=True, symmetric=True, axis=axis if o.per_channel else None)
        self.weights[node.name] = WeightSite(node.name, kind, weight, bias, spec, x.name)
        if o.mode == "dynamic":
            return True
        self.demand(x, f"input of {name}")
        if kind in ("conv", "conv_transpose"):
            self.demand(self._output_point(node), f"output of {name} (QLinearConv has no float output)")
        return True

    def _embedding(self, node: torch.fx.Node) -> bool:
        if quant_role(self.gm, node) != "embedding":
            return False
        m = _module(self.gm, node)
        if m.max_norm is not None or len(node.args) != 1 or node.kwargs:
            self.float_ops[node.name] = f"{node.target}: an embedding with max_norm or extra arguments; left float"
        elif self._excluded(node):
            self.float_ops[node.name] = f"{node.target}: excluded"
        elif m.weight.is_floating_point() and m.weight.numel() < SMALL_TABLE:
            self.float_ops[node.name] = (f"{node.target}: a table of {m.weight.numel()} values stays float (int8 would "
                                         f"save under {SMALL_TABLE * 3 // 1024} KB and dequantizing every lookup "
                                         f"costs more than reading float rows)")
        elif m.weight.is_floating_point():
            spec = QuantSpec(bits=self.o.weight_bits, signed=True, symmetric=True,
                             axis=0 if self.o.per_channel else None)
            self.weights[node.name] = WeightSite(node.name, "embedding", f"{node.target}.weight", None, spec, None)
        return True

    def _matmul(self, node: torch.fx.Node) -> bool:
        if quant_role(self.gm, node) != "matmul":
            return False
        if self.o.mode == "dynamic":
            self.float_ops[node.name] = f"{node.name}: dynamic mode quantizes Linear layers only"
            return True
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if self._excluded(node):
            self.float_ops[node.name] = f"{node.name}: excluded"
            return True
        for i, operand in enumerate((a, b)):
            param = _param(self.gm, operand)
            if param is not None:
                spec = QuantSpec(bits=self.o.weight_bits, signed=True, symmetric=True)
                self.weights[node.name] = WeightSite(node.name, "matmul", param, None, spec,
                                                     (b if i == 0 else a).name, operand=i)
            elif _float_tensor(operand):
                self.demand(operand, f"operand {i} of {node.name}")
            else:
                self.float_ops[node.name] = f"{node.name}: operand {i} is not a floating-point tensor; left float"
        return True

    def _add(self, node: torch.fx.Node) -> bool:
        if quant_role(self.gm, node) != "add":
            return False
        tensors = [a for a in node.args[:2] if _float_tensor(a)]
        if self.o.quantize_add_inputs and len(tensors) == 2 and not self._excluded(node):
            for t in tensors:
                self.demand(t, f"input of {node.name} (quantize_add_inputs)")
            self.demand(self._output_point(node), f"output of {node.name} (quantize_add_inputs)")
        return True

    def _note_float(self, node: torch.fx.Node) -> None:
        m = _module(self.gm, node)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            self.float_ops[node.name] = f"{node.target}: BatchNorm left float; run fold_bn before quantizing"
            return
        try:
            macs = counting.node_macs(self.gm, node)
        except Exception:  # noqa: BLE001 - counting is advisory here
            macs = 0
        norm = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
        weighted = m is not None and not isinstance(m, norm) and any(True for _ in m.parameters(recurse=False))
        if macs or weighted:
            what = type(m).__name__ if m is not None else getattr(node.target, "__name__", str(node.target))
            self.float_ops[node.name] = (f"{node.target if m is not None else node.name} ({what}): "
                                         f"no quantization rule, left float")

    def _build(self) -> QuantPlan:
        classes: dict[str, list[str]] = {}
        order = {n.name: i for i, n in enumerate(self.gm.graph.nodes)}
        for name in sorted(self.parent, key=order.__getitem__):
            if _float_tensor(self.nodes[name]):
                classes.setdefault(self._find(name), []).append(name)
        sites = {}
        for i, members in enumerate(sorted(classes.values(), key=lambda ms: order[ms[0]])):
            values = tuple(m for m in members if m not in self.passthrough)
            shared = tuple(m for m in members if m in self.passthrough)
            if not values:  # a pass-through cycle cannot happen in a DAG; values are the producers
                values, shared = shared[:1], shared[1:]
            name = f"act_{i}"
            sites[name] = Site(name, self._spec(values), values, shared, self.reason[members[0]])
        return QuantPlan(sites, self.weights, self.float_ops, self.o.activation_bits, self.o.weight_bits, self.o.mode,
                         graph_signature(self.gm))

    def _spec(self, values: tuple[str, ...]) -> QuantSpec:
        o = self.o
        after_relu = all(is_relu(self.gm, self.nodes[v]) for v in values)
        common = dict(bits=o.activation_bits, method=o.method, tolerance=o.tolerance, percentile=o.percentile,
                      bins=o.bins)
        if after_relu:
            return QuantSpec(signed=not o.unsigned_after_relu, symmetric=True, **common)
        return QuantSpec(signed=False, symmetric=False, **common)


def plan_quantization(gm: torch.fx.GraphModule, options: Options) -> QuantPlan:
    return Planner(gm, options).plan()
