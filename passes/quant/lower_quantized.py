"""Replace observers by fake-quantization so that the PyTorch module computes what the INT8 model computes.

    before:  y = observers.act_1(relu(conv1(observers.act_0(x))))
    after:   x_q = fake_quantize_per_tensor_affine(x, qparams.act_0_scale, qparams.act_0_zero, 0, 255)
             w_q = fake_quantize_per_channel_affine(conv1.weight, qparams.conv1_w_scale, qparams.conv1_w_zero, 0, -128, 127)
             y   = fake_quantize_per_tensor_affine(relu(conv2d(x_q, w_q, qparams.conv1_bias, ...)),
                                                   qparams.act_1_scale, qparams.act_1_zero, 0, 255)

Every scale and zero point is a buffer of the ``qparams`` submodule (``<site>_scale`` / ``_zero`` for activations,
``<node>_w_scale`` / ``_w_zero`` for weights) that the graph reads: they are state, so ``load_state_dict`` into a
module compiled with the same recipe reproduces the outputs exactly, and ``fxc.load`` restores them.

Each quantized tensor is rounded to its grid and clamped to its integer range; pass-through tensors (max-pool,
flatten, cat inputs) get the same parameters as their source, which changes no value and gives ONNX Runtime the
QuantizeLinear/DequantizeLinear pairs it needs to keep them in uint8.  Weights are fake-quantized from their own
min/max (symmetric, per output channel unless ``per_channel=False``); biases are rounded to the int32 grid of
input scale x weight scale, the bias QLinearConv/QGemm add.  Exported with ``export_onnx``, the module becomes QDQ
ONNX: int8 weight initializers, int32 biases, uint8 activations.

Bias correction (``bias_correction``, on by default when calibration data is given): the quantization error of a
weight shifts the mean of every output channel by E[op(x, W_q - W)]; that mean, measured on up to
``bias_correction_samples`` calibration samples, is subtracted from the bias (a layer without bias gets one), in
static and dynamic mode; every call of a shared layer gets its own corrected bias.  The
forwards that measure it run channels-last where the model allows, as calibration's do (``calibrate.forward_layout``).

A convolution whose quantized input and output (directly or after its ReLU) are both on grids is simulated as ONNX
Runtime's QLinearConv computes it (``modules.requantized_conv``): the integer accumulator exactly, requantized with
the float32 multiplier and rounded half to even.  Rounding the float convolution instead flips values that lie
within float error of a rounding boundary, and in deep depthwise stacks (MobileNetV2) those flips grow to several
output steps.  Exported, it is the plain convolution that ORT fuses back into QLinearConv.  Likewise an add of two
quantized tensors whose sum is quantized (MobileNetV2's residuals) is computed as ORT's QLinearAdd does
(``modules.quantized_add``: integer codes, float32 scale ratios, fused multiply-adds): adding the dequantized floats
flipped a few sums per million, and 17 blocks deep those flips reached 2.8 output steps on an Intel Xeon.

``accumulator_bits`` simulates a narrow integer accumulator (e.g. 16 with 6-bit weights): each quantized
Conv/Linear's accumulator, sum(x_int * w_int) before the bias, saturates at the signed range of that width; the
overflow rate of every layer (share of its accumulator values out of range) is measured on the example inputs and
up to ``overflow_batches`` calibration batches and reported in the stats.  It simulates the final sum only, not
the order of partial sums, and is meant for PyTorch: the export runs it as float ops.

Requires: ``quant_plan`` and ``quant_params`` (insert_observers, calibrate).  Contract: BOUNDED: the outputs move
by at most ``max_error`` x their scale on the example inputs (a sanity bound against a broken lowering: the
measured error and the SQNR of the outputs are in the stats).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from fxcompress.passes.quant.calibrate import (
    calibration_batches,
    forward_layout,
    grouped,
)
from fxcompress.passes.quant.insert_observers import HOLDER
from fxcompress.passes.quant.lib.calibrators import MinMax
from fxcompress.passes.quant.lib.quant_plan import (
    QuantPlan,
    WeightSite,
    quant_role,
)
from fxcompress.passes.quant.lib.quant_spec import FakeQuant, QuantParams, qparams

from fxcompress import meta
from fxcompress.context import CompileContext
from fxcompress.errors import InputError, PassError, RecipeError, VerificationError
from fxcompress.fxutil import lookup
from fxcompress.instruments import sqnr_db
from fxcompress.modules import (
    NarrowAccumulator,
    Observer,
    bias_step,
    dynamic_quant_linear,
    quantization_stage,
    quantized_add,
    quantized_embedding,
    requantized_conv,
)
from fxcompress.pass_base import Contract, Pass, PassResult
from fxcompress.plans import Lifetime, Table, graph_signature, replayed
from fxcompress.progress import progress

CONSTANTS = "qparams"  # submodule holding per-channel scales, zero points and rounded biases
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _reads_metadata(node: torch.fx.Node) -> bool:
    """``w.shape``, ``w.size()``, ``w.dim()``, ``w.dtype``: a read of a weight's metadata, not of its values."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "dtype", "device", "ndim")
    return node.op == "call_method" and node.target in ("size", "dim")


def weight_fake_quant(site: WeightSite, weight: torch.Tensor) -> FakeQuant:
    cal = MinMax(site.spec.axis)
    cal.update(weight)
    scale, zero = qparams(site.spec, cal)
    return FakeQuant.of(site.spec, scale, zero, storage_unsigned=False)


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """The parameters of one quantized tensor and the buffers that hold them (``qparams.<name>_scale`` and
    ``_zero``): the graph reads scales and zero points from these buffers, so they are state (``state_dict``)."""

    fq: FakeQuant
    scale: str  # buffer targets
    zero: str

    @classmethod
    def register(cls, constants: nn.Module, name: str, fq: FakeQuant) -> Quantizer:
        scale, zero = f"{name}_scale", f"{name}_zero"
        if not hasattr(constants, scale):
            constants.register_buffer(scale, fq.scale.detach().clone().float())
            constants.register_buffer(zero, fq.zero.detach().clone().to(torch.int32))
        return cls(fq, f"{CONSTANTS}.{scale}", f"{CONSTANTS}.{zero}")

    def nodes(self, gm: torch.fx.GraphModule, before: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
        """get_attr nodes of the scale and zero point, inserted before ``before``."""
        out = []
        for target in (self.scale, self.zero):
            with gm.graph.inserting_before(before):
                n = gm.graph.get_attr(target)
            n.meta[meta.TENSOR] = meta.describe(lookup(gm, target))
            out.append(n)
        return out[0], out[1]


@dataclasses.dataclass(frozen=True)
class BiasCorrections(Table):
    """{weighted node name: per-output-channel correction (float64)}: what bias correction measured on the
    calibration data and subtracted from each layer's bias.  Given back to ``compile(..., plans=...)``, the
    corrections are applied as they are, without running the data again."""

    kind = "bias_corrections"
    owner = "lower_quantized"
    lifetime = Lifetime.RESULT

    def summary(self) -> str:
        worst = max((float(c.abs().max()) for c in self.entries.values()), default=0.0)
        return f"{len(self.entries)} layers corrected (largest |correction| {worst:.3g})"


class LowerQuantized(Pass):
    """Observers become fake-quantize nodes; weights and biases are quantized; export gives QDQ ONNX."""

    name = "lower_quantized"
    contract = Contract.BOUNDED
    writes_tensors = True  # bias correction runs channels-last: the parameters' storage is swapped and back
    requires = (QuantPlan, QuantParams)
    produces = (BiasCorrections,)

    def __init__(self, accumulator_bits: int | None = None, overflow_batches: int = 8, max_error: float = 1.0,
                 bias_correction: bool = True, bias_correction_samples: int = 128):
        if accumulator_bits is not None and (not isinstance(accumulator_bits, int) or not 8 <= accumulator_bits <= 32):
            raise RecipeError(f"lower_quantized: accumulator_bits must be an integer from 8 to 32, "
                              f"got {accumulator_bits!r}.")
        if not isinstance(bias_correction_samples, int) or bias_correction_samples < 1:
            raise RecipeError(f"lower_quantized: bias_correction_samples must be a positive integer, "
                              f"got {bias_correction_samples!r}.")
        self.accumulator_bits, self.overflow_batches, self.max_error = accumulator_bits, overflow_batches, max_error
        self.bias_correction, self.bias_correction_samples = bool(bias_correction), bias_correction_samples

    def error_bound(self, ctx: CompileContext) -> float:
        return self.max_error

    def bound_hint(self, ctx: CompileContext) -> str:
        return ("the quantized outputs on the example inputs are far from the float ones. Usually the calibration "
                "data does not look like the example inputs (all zeros, another scale or preprocessing): calibrate "
                "on inputs like the model's real ones, and trace with one of them as the example. A model that "
                "does not quantize well can raise the bound with lower_quantized's max_error.")

    def verify(self, ctx: CompileContext) -> None:
        """Every planned site is lowered: no observer is left, every calibrated site that still has a tensor to
        quantize has its scale among the constants, and every planned weight the graph reads is read through its
        fake-quantization (no weighted layer of the plan is called as a float module)."""
        gm, plan, params = ctx.gm, ctx.plans[QuantPlan], ctx.plans[QuantParams]
        if hasattr(gm, HOLDER) or any(isinstance(m, Observer) for m in gm.modules()):
            raise VerificationError(f"[{self.name}] left observers in the module.")
        constants = getattr(gm, CONSTANTS, None)
        names = {n.name for n in gm.graph.nodes}
        for site in params:
            if constants is not None and hasattr(constants, f"{site}_scale"):
                continue
            if any(v in names for v in plan.sites[site].values):
                raise VerificationError(f"[{self.name}] site {site} was calibrated but not lowered.")
        weights = {site.weight for site in plan.weights.values()}
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target in weights:
                bad = [u.name for u in node.users if u.target not in (torch.fake_quantize_per_tensor_affine,
                                                                       torch.fake_quantize_per_channel_affine)
                       and not _reads_metadata(u)]
                if bad:
                    raise VerificationError(f"[{self.name}] {node.target} is read unquantized by {bad[:3]}.")
            if node.op == "call_module" and any(w.rpartition(".")[0] == node.target for w in weights):
                raise VerificationError(f"[{self.name}] {node.target} is still called as a float module.")

    def run(self, ctx: CompileContext) -> PassResult:
        gm, plan, params = ctx.gm, ctx.plans[QuantPlan], ctx.plans[QuantParams]
        stage = quantization_stage(gm)
        if stage is not None and stage[0] == "quantized":
            raise PassError(f"[{self.name}] the module is already lowered (node {stage[1].name!r}); a model is lowered "
                            f"once, after insert_observers and calibrate.")
        with meta.side_effect_free(gm):
            before = gm(*ctx.example_inputs)
        graph = gm.graph
        nodes = {n.name: n for n in graph.nodes}
        weights = {site.node: weight_fake_quant(site, lookup(gm, site.weight).detach())
                   for site in plan.weights.values() if site.node in nodes}
        given = replayed(ctx, BiasCorrections, self.name)
        if given is not None:
            unknown = sorted(set(given) - {site.node for site in plan.weights.values() if site.node in nodes})
            if unknown:
                raise InputError(f"[{self.name}] the given bias_corrections name layers this plan does not quantize: "
                                 f"{', '.join(unknown[:5])}.")
            corrections = dict(given.items())
        elif self.bias_correction and ctx.calibration_data is not None:
            corrections = self._bias_corrections(gm, ctx, plan, nodes, weights)
        else:
            corrections = {}
        ctx.plans[BiasCorrections] = given if given is not None else BiasCorrections(corrections, graph_signature(gm))
        constants = nn.Module()
        gm.add_submodule(CONSTANTS, constants)
        stats: dict[str, Any] = {"activations": 0, "shared": 0, "weights": 0, "biases_rounded": 0,
                                 "biases_corrected": len(corrections)}
        if given is not None:
            stats["replayed"] = True
        quantizers: dict[torch.fx.Node, Quantizer] = {}  # fake-quant node -> its parameters and their buffers
        for node in list(graph.nodes):
            if node.op == "call_module" and isinstance(node.target, str) and node.target.startswith(HOLDER + "."):
                site = node.target.split(".", 1)[1]
                source = node.args[0]
                fq = params.get(site)
                if fq is None:
                    node.replace_all_uses_with(source)
                else:
                    quantizer = Quantizer.register(constants, site, fq)
                    quantizers[self._fake_quant_after(gm, node, quantizer, replace=True)] = quantizer
                    stats["activations"] += 1
                graph.erase_node(node)
        for name, site in plan.sites.items():
            fq = params.get(name)
            for value in site.shared if fq is not None else ():
                if value in nodes:
                    quantizer = Quantizer.register(constants, name, fq)
                    quantizers[self._fake_quant_after(gm, nodes[value], quantizer)] = quantizer
                    stats["shared"] += 1
        accumulators: dict[str, NarrowAccumulator] = {}
        for site in plan.weights.values():
            if site.node not in nodes:
                continue
            stats["weights"] += 1
            wq = weights[site.node]
            if site.kind == "embedding":
                self._lower_embedding(gm, nodes[site.node], site, wq, constants)
            elif plan.mode == "dynamic":
                self._lower_dynamic(gm, nodes[site.node], site, wq, constants, corrections.get(site.node))
            else:
                stats["biases_rounded"] += self._lower_weighted(gm, nodes[site.node], site, wq, constants,
                                                                accumulators, quantizers, corrections.get(site.node))
        stats["adds_requantized_exactly"] = sum(self._requantize_add(gm, n, quantizers) for n in list(graph.nodes))
        if hasattr(gm, HOLDER):
            gm.delete_submodule(HOLDER)
        meta.eliminate_dead_code(graph)
        gm.recompile()
        meta.propagate(gm, ctx.example_inputs)
        with meta.side_effect_free(gm):
            after = gm(*ctx.example_inputs)
        stats["output_sqnr_db"] = round(sqnr_db(before, after), 2)
        stats["convs_requantized_exactly"] = sum(1 for n in gm.graph.nodes if n.target is requantized_conv)
        if accumulators:
            stats["overflow_rate"] = self._overflow(gm, ctx, accumulators)
            stats["layers_overflowing"] = sum(1 for r in stats["overflow_rate"].values() if r > 0)
        return PassResult(modified=True, stats=stats)

    def _fake_quant_after(self, gm: torch.fx.GraphModule, node: torch.fx.Node, quantizer: Quantizer,
                          replace: bool = False) -> torch.fx.Node:
        """Insert fake-quantization of ``node``'s value (of an observer's input when ``replace``), reading the scale
        and zero point from their buffers, and route every use through it."""
        value = node.args[0] if replace else node
        fq = quantizer.fq
        with gm.graph.inserting_after(node):
            q = gm.graph.call_function(torch.fake_quantize_per_tensor_affine, (value,))
        scale, zero = quantizer.nodes(gm, q)
        q.args = (value, scale, zero, fq.qmin, fq.qmax)
        q.meta[meta.TENSOR] = value.meta[meta.TENSOR]
        meta.add_provenance(q, self.name, f"quantizes {value.name}: {fq}")
        if replace:
            node.replace_all_uses_with(q)
        else:
            node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
        return q

    def _lower_weighted(self, gm: torch.fx.GraphModule, node: torch.fx.Node, site: WeightSite, wq: FakeQuant,
                        constants: nn.Module, accumulators: dict[str, NarrowAccumulator],
                        quantizers: dict[torch.fx.Node, Quantizer], correction: torch.Tensor | None = None) -> int:
        graph = gm.graph
        weight = lookup(gm, site.weight)
        key = node.name
        weight_quantizer = Quantizer.register(constants, f"{key}_w", wq)
        with graph.inserting_before(node):
            w = graph.get_attr(site.weight)
            scale, zero = weight_quantizer.nodes(gm, node)
            if wq.axis is None:
                wfq = graph.call_function(torch.fake_quantize_per_tensor_affine, (w, scale, zero, wq.qmin, wq.qmax))
            else:
                wfq = graph.call_function(torch.fake_quantize_per_channel_affine,
                                          (w, scale, zero, wq.axis, wq.qmin, wq.qmax))
        for n in (w, wfq):
            n.meta[meta.TENSOR] = meta.describe(weight)
        meta.add_provenance(wfq, self.name, f"quantizes {site.weight}: {wq}")
        if site.kind == "matmul":
            args = list(node.args)
            args[site.operand] = wfq
            node.args = tuple(args)
            return 0
        x = node.args[0]
        x_quantizer = quantizers.get(x)  # every use of a quantized value goes through its fake-quant node
        xq = x_quantizer.fq if x_quantizer is not None else None
        bias_node, rounded = self._bias(gm, node, site, wq, xq, constants, correction)
        fn, args, kwargs, pad = self._functional(gm, node, site)
        acc = None
        if self.accumulator_bits is not None and xq is not None:
            acc_scale = bias_step(xq.scale, wq.scale)
            acc = NarrowAccumulator(acc_scale, self.accumulator_bits, 1 if site.kind != "linear" else -1)
            gm.add_submodule(f"accumulators_{key}", acc)
            accumulators[node.target if node.op == "call_module" else key] = acc
        with graph.inserting_before(node):
            inp = x
            if pad is not None:
                inp = graph.call_function(F.pad, (x, pad[0]), {"mode": pad[1]})
            new = graph.call_function(fn, (inp, wfq, None if acc is not None else bias_node, *args), kwargs)
            out = new
            if acc is not None:
                out = graph.call_module(f"accumulators_{key}", (new, bias_node))
        node.replace_all_uses_with(out)
        for n in {inp, new, out}:
            if n is not x:
                n.meta[meta.TENSOR] = node.meta[meta.TENSOR]
        if acc is None and x_quantizer is not None and fn in _CONV.values() and not kwargs:
            self._requantize_exactly(gm, new, x_quantizer, scale, quantizers)
        meta.add_provenance(out, self.name, f"{node.target if node.op == 'call_module' else node.name} "
                                            f"with int{wq.qmax.bit_length() + 1} weights")
        graph.erase_node(node)
        return int(rounded)

    def _requantize_exactly(self, gm: torch.fx.GraphModule, conv: torch.fx.Node, x_quantizer: Quantizer,
                            w_scale: torch.fx.Node, quantizers: dict[torch.fx.Node, Quantizer]) -> None:
        """A convolution whose output is quantized (directly or after its ReLU) computes its integer accumulator
        exactly and requantizes it as ONNX Runtime's QLinearConv does (``modules.requantized_conv``)."""
        users = list(conv.users)
        if len(users) == 1 and quant_role(gm, users[0]) == "relu":
            users = list(users[0].users)
        if not (len(users) == 1 and users[0] in quantizers):
            return
        y_quantizer = quantizers[users[0]]
        x, w, b, *rest = conv.args
        rest += [1, 0, 1, 1][len(rest):]  # F.conv*'s defaults: stride, padding, dilation, groups
        x_scale, _ = x_quantizer.nodes(gm, conv)
        y_scale, y_zero = y_quantizer.nodes(gm, conv)
        conv.target = requantized_conv
        conv.args = (x, w, b, x_scale, w_scale, y_scale, y_zero, y_quantizer.fq.qmin, y_quantizer.fq.qmax, *rest)
        meta.add_provenance(conv, self.name, "integer accumulator requantized as QLinearConv")

    def _requantize_add(self, gm: torch.fx.GraphModule, add: torch.fx.Node,
                        quantizers: dict[torch.fx.Node, Quantizer]) -> bool:
        """An add of two quantized tensors whose sum is quantized becomes ``modules.quantized_add`` (QLinearAdd's
        arithmetic); returns whether it did."""
        if not (add.op == "call_function" and add.target in (operator.add, torch.add) and not add.kwargs
                and len(add.args) == 2 and all(a in quantizers for a in add.args)):
            return False
        users = list(add.users)
        if not (len(users) == 1 and users[0] in quantizers):
            return False
        a, b = add.args
        y = quantizers[users[0]]
        if not all(q.fq.axis is None for q in (quantizers[a], quantizers[b], y)):
            return False
        sa, za = quantizers[a].nodes(gm, add)
        sb, zb = quantizers[b].nodes(gm, add)
        sy, zy = y.nodes(gm, add)
        add.target = quantized_add
        add.args = (a, b, sa, za, sb, zb, sy, zy, y.fq.qmin, y.fq.qmax)
        meta.add_provenance(add, self.name, "sum requantized as QLinearAdd")
        return True

    def _lower_dynamic(self, gm, node: torch.fx.Node, site: WeightSite, wq: FakeQuant, constants: nn.Module,
                       correction: torch.Tensor | None = None) -> None:
        """Linear -> dynamic_quant_linear(x, int8 weight, zero points, per-row scales, bias); ``addmm(b, x, W)`` the
        same with the integer weight transposed to out x in.  A bias correction is subtracted from a copy of the
        bias (every call of a shared layer gets its own)."""
        graph = gm.graph
        weight = wq.apply(lookup(gm, site.weight).detach())
        x = _input(node, site)
        if site.kind == "addmm":
            weight = weight.t()
        ints, scale = _int8_rows(wq, weight)
        # Symmetric weights: one zero point, and one scale for a per-tensor weight.  ORT's integer GEMM takes a
        # slower path for a vector of zero points even when every one is 0 (BERT: 0.4 %).
        scale = scale if wq.axis is not None else scale[0].clone()
        tensors = {"int8": ints, "zero": torch.zeros((), dtype=torch.int8), "scale": scale}
        with graph.inserting_before(node):
            args = _constant_nodes(graph, constants, f"{node.name}_w", tensors)
            bias, _ = self._bias(gm, node, site, wq, None, constants, correction)
            new = graph.call_function(dynamic_quant_linear, (x, *args, bias))
        new.meta[meta.TENSOR] = node.meta[meta.TENSOR]
        meta.add_provenance(new, self.name, f"{site.weight}: int8 weights, activations quantized per batch")
        node.replace_all_uses_with(new)
        graph.erase_node(node)

    def _lower_embedding(self, gm, node: torch.fx.Node, site: WeightSite, wq: FakeQuant,
                         constants: nn.Module) -> None:
        """Embedding -> quantized_embedding(ids, int8 table, scale per row)."""
        graph = gm.graph
        ints, scale = _int8_rows(wq, wq.apply(lookup(gm, site.weight).detach()))
        with graph.inserting_before(node):
            args = _constant_nodes(graph, constants, f"{node.name}_table", {"int8": ints, "scale": scale[:, None]})
            new = graph.call_function(quantized_embedding, (node.args[0], *args))
        new.meta[meta.TENSOR] = node.meta[meta.TENSOR]
        meta.add_provenance(new, self.name, f"{site.weight}: int8 table, rows dequantized as they are read")
        node.replace_all_uses_with(new)
        graph.erase_node(node)

    def _bias(self, gm, node, site: WeightSite, wq: FakeQuant, xq: FakeQuant | None, constants: nn.Module,
              correction: torch.Tensor | None = None):
        """(bias node or None, whether it was rounded to the int32 grid of input scale x weight scale); a bias
        correction is subtracted first (a layer without bias gets one)."""
        graph = gm.graph
        if site.bias is None and correction is None:
            return None, False
        bias = lookup(gm, site.bias).detach() if site.bias is not None else None
        if correction is not None:
            bias = (bias.double() if bias is not None else 0.0) - correction
        with graph.inserting_before(node):
            if xq is None and correction is None:  # input not quantized: the bias stays as it is
                b = graph.get_attr(site.bias)
                b.meta[meta.TENSOR] = meta.describe(bias)
                return b, False
            if xq is None:
                rounded = bias.float()
            else:
                step = bias_step(xq.scale, wq.scale)
                rounded = (torch.round(bias / step) * step).float()
            constants.register_buffer(f"{node.name}_bias", rounded)
            b = graph.get_attr(f"{CONSTANTS}.{node.name}_bias")
            b.meta[meta.TENSOR] = meta.describe(rounded)
        return b, xq is not None

    def _bias_corrections(self, gm: torch.fx.GraphModule, ctx: CompileContext, plan, nodes: dict[str, torch.fx.Node],
                          weights: dict[str, FakeQuant]) -> dict[str, torch.Tensor]:
        """Empirical bias correction: for every quantized Conv/ConvTranspose/Linear, the mean over the calibration
        data of what its weight's quantization error adds to each output channel, E[op(x, W_q - W)]; subtracting
        it from the bias removes the systematic shift (the errors of depthwise and low-bit weights do not average
        out).  ``x`` is the float input, as the calibration forwards see it."""
        deltas, ops, sources = {}, {}, {}
        for site in plan.weights.values():
            if site.kind in ("matmul", "embedding") or site.node not in nodes:
                continue
            weight = lookup(gm, site.weight).detach()
            delta = weights[site.node].apply(weight) - weight
            deltas[site.node] = delta.t() if site.kind == "addmm" else delta  # addmm(b, x, W): W is in x out
            ops[site.node] = self._functional(gm, nodes[site.node], site)
            sources[site.node] = _input(nodes[site.node], site)
        if not deltas:
            return {}
        sums: dict[str, torch.Tensor] = {}
        counts = dict.fromkeys(deltas, 0)

        class Collect(torch.fx.Interpreter):
            def run_node(self, n: torch.fx.Node) -> Any:
                out = super().run_node(n)
                if n.name in deltas:
                    fn, args, kwargs, pad = ops[n.name]
                    x = self.env[sources[n.name]]
                    if pad is not None:
                        x = F.pad(x, pad[0], mode=pad[1])
                    total, count = _weight_error_sum(fn, x, deltas[n.name], args, kwargs)
                    sums[n.name] = sums[n.name] + total if n.name in sums else total
                    counts[n.name] += count
                return out

        samples = 0
        with meta.side_effect_free(gm), forward_layout(gm, ctx.example_inputs) as layout, \
                progress(self.bias_correction_samples, "bias correction", "sample") as bar:
            for inputs, _ in grouped(calibration_batches(ctx), 16):
                Collect(gm).run(*(layout(t) for t in inputs))
                samples += inputs[0].shape[0]
                bar.update(inputs[0].shape[0])
                if samples >= self.bias_correction_samples:
                    break
        return {name: sums[name] / counts[name] for name in sums if counts[name]}

    def _functional(self, gm, node, site: WeightSite):
        """(function, positional args after (x, w, b), kwargs, (padding, mode) or None) for the weighted op; an
        ``addmm(b, x, W)`` as the linear layer it is."""
        if site.kind == "addmm":
            return F.linear, (), {}, None
        if node.op != "call_module":
            rest = tuple(node.args[3:])
            kwargs = {k: v for k, v in node.kwargs.items() if k not in ("weight", "bias")}
            return node.target, rest, kwargs, None
        m = gm.get_submodule(node.target)
        if site.kind == "linear":
            return F.linear, (), {}, None
        dims = len(m.kernel_size)
        if site.kind == "conv_transpose":
            return _CONV_T[dims], (m.stride, m.padding, m.output_padding, m.groups, m.dilation), {}, None
        if m.padding_mode != "zeros":
            return _CONV[dims], (m.stride, 0, m.dilation, m.groups), {}, (m._reversed_padding_repeated_twice,
                                                                           m.padding_mode)
        return _CONV[dims], (m.stride, m.padding, m.dilation, m.groups), {}, None

    def _overflow(self, gm, ctx: CompileContext, accumulators: dict[str, NarrowAccumulator]) -> dict[str, float]:
        batches = [ctx.example_inputs]
        if ctx.calibration_data is not None and self.overflow_batches:
            for i, batch in enumerate(calibration_batches(ctx)):
                if i >= self.overflow_batches:
                    break
                batches.append(batch)
        for acc in accumulators.values():
            acc.reset_counts()
        with torch.no_grad():
            for batch in batches:
                gm(*batch)
        return {name: round(acc.overflow_rate(), 6) for name, acc in accumulators.items()}




def _input(node: torch.fx.Node, site: WeightSite) -> torch.fx.Node:
    """The activation a weighted op reads: ``x`` of ``addmm(b, x, W)``, else its first argument."""
    return node.args[1] if site.kind == "addmm" else node.args[0]


def _int8_rows(wq: FakeQuant, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 scale per row) of a weight ``wq`` put on its grid: a per-tensor scale repeated."""
    scale = (wq.scale if wq.axis is not None else wq.scale.expand(weight.shape[0])).float().clone()
    return torch.round(weight / scale[:, None]).to(torch.int8), scale


def _constant_nodes(graph: torch.fx.Graph, constants: nn.Module, prefix: str,
                    tensors: dict[str, torch.Tensor]) -> list[torch.fx.Node]:
    """Each tensor registered as the buffer ``<prefix>_<name>`` of ``constants`` and read by a get_attr node."""
    nodes = []
    for part, value in tensors.items():
        constants.register_buffer(f"{prefix}_{part}", value)
        nodes.append(graph.get_attr(f"{CONSTANTS}.{prefix}_{part}"))
        nodes[-1].meta[meta.TENSOR] = meta.describe(value)
    return nodes


def _weight_error_sum(fn, x: torch.Tensor, delta: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, int]:
    """(sum over every output position of op(x, delta) per output channel, number of positions), float64.

    A convolution's output at a position is delta applied to the input patch there, so the sum over positions is
    delta applied to the sum of the patches: one strided slice sum per kernel offset instead of a second
    convolution.  Linear layers sum their inputs.  Anything else (transposed or string-padded convolutions,
    keyword arguments) runs the op with ``delta``.
    """
    dims = delta.dim() - 2
    if fn is F.linear and not args and not kwargs:
        rows = x.reshape(-1, x.shape[-1])
        return delta.double() @ rows.sum(0).double(), rows.shape[0]
    if fn in _CONV.values() and not kwargs and len(args) == 4 and not isinstance(args[1], str):
        stride, padding, dilation, groups = (_tuple(a, dims) if i < 3 else a for i, a in enumerate(args))
        if x.dim() == dims + 1:
            x = x.unsqueeze(0)
        batch = x.shape[0]
        # The batch sum first (one pass), then the window sums on one sample's size.  A channels-last tensor is
        # summed as its dense channels-last view: reducing it through its strides is an order of magnitude slower.
        summed = x.movedim(1, -1).sum(0).movedim(-1, 0) if x.movedim(1, -1).is_contiguous() else x.sum(0)
        x = F.pad(summed.double(), [p for q in reversed(padding) for p in (q, q)])
        kernel = delta.shape[2:]
        out = [(x.shape[1 + d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(dims)]
        patch = torch.empty(x.shape[0], *kernel, dtype=torch.float64)
        for offset in itertools.product(*(range(k) for k in kernel)):
            window = tuple(slice(o * dil, o * dil + st * (n - 1) + 1, st)
                           for o, dil, st, n in zip(offset, dilation, stride, out))
            patch[(slice(None), *offset)] = x[(slice(None), *window)].sum(dim=list(range(1, 1 + dims)))
        per_group = delta.shape[1] * math.prod(kernel)
        total = torch.einsum("goi,gi->go", delta.double().reshape(groups, -1, per_group),
                             patch.reshape(groups, per_group)).reshape(-1)
        return total, batch * math.prod(out)
    err = fn(x, delta, None, *args, **kwargs)
    axis = -1 if fn is F.linear else 1
    return err.movedim(axis, 0).reshape(err.shape[axis], -1).sum(1).double(), err.numel() // err.shape[axis]


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
