"""Insert observers where the quantization plan says, without changing the model's function.

    before:  y = conv(x)                       after:  y = observers.act_1(relu(conv(observers.act_0(x))))
             z = relu(y)

The planner (``quant_plan.py``) decides, as data, which tensors share which ``QuantSpec``; this pass writes the
plan to ``ctx.plans[QuantPlan]`` and puts one ``Observer`` per site under ``gm.observers``, called on every
observed tensor of the site.  Observers return their input: outputs are unchanged bit for bit.

Options (recipe keys of ``quantize``): ``activation_observer`` (minmax, percentile, mse, kl, kl_tolerance),
``tolerance`` (kl_tolerance), ``percentile``, ``bins`` (histogram bins), ``bits`` (both widths, 2-8) or
``weight_bits`` / ``activation_bits``, ``per_channel`` (weights), ``unsigned_after_relu`` (ReLU outputs on
[0, T] with all 2^bits codes; off: a signed symmetric grid, half of it unused), ``quantize_add_inputs``,
``exclude`` (module name patterns left float), ``mode`` (``static``; ``dynamic``: Linear layers get int8 weights and
activations quantized per batch at run time, nothing to observe or calibrate, for Linear-heavy models; with
calibration data, lower_quantized corrects their biases).

A ``QuantPlan`` given to ``compile(..., plans=...)`` is applied as it is (its specs, not this pass's options).
Requires: shape metadata.  Contract: EXACT, bit for bit.
Weight-shared and binarized layers (``CodebookLayer``, ``LowBitLayer`` with float inputs) become their plain layers
first (the same weights): their values then land on the per-channel INT8 grid and run as INT8 kernels.
Skips (named in the notes): ops no rule quantizes (their weights stay float), unfolded BatchNorm.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from fxcompress.passes.quant.lib.quant_plan import Options, QuantPlan, plan_quantization
from fxcompress.passes.quant.lib.quant_spec import METHODS

from fxcompress import meta
from fxcompress.context import CompileContext
from fxcompress.errors import InputError, RecipeError, VerificationError
from fxcompress.lowbit import expand_low_bit_layers
from fxcompress.modules import Observer
from fxcompress.options import as_patterns, check_patterns
from fxcompress.pass_base import Contract, Pass, PassResult, refuse_quantized
from fxcompress.plans import replayed

HOLDER = "observers"


def _bits(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise RecipeError(f"insert_observers: {what} must be an integer from 2 to 8, got {value!r}.")
    return value


class InsertObservers(Pass):
    """Annotate which tensors get which quantization spec, then insert observers there (outputs unchanged)."""

    name = "insert_observers"
    produces = (QuantPlan,)
    contract = Contract.EXACT
    exact_tolerance = (0.0, 0.0)

    def __init__(self, activation_observer: str = "kl_tolerance", tolerance: float = 1.3, per_channel: bool = True,
                 bits: int = 8, weight_bits: int | None = None, activation_bits: int | None = None,
                 unsigned_after_relu: bool = True, quantize_add_inputs: bool = False, percentile: float = 99.999,
                 bins: int = 2048, exclude: str | list[str] | tuple[str, ...] = (), mode: str = "static"):
        if activation_observer not in METHODS:
            raise RecipeError(f"insert_observers: activation_observer must be one of {', '.join(METHODS)}, "
                              f"got {activation_observer!r}.")
        if not tolerance >= 1.0:
            raise RecipeError(f"insert_observers: tolerance must be >= 1.0 (1.0 is plain KL), got {tolerance!r}.")
        if not 0 < percentile <= 100:
            raise RecipeError(f"insert_observers: percentile must be in (0, 100], got {percentile!r}.")
        if bins < 256 or bins & (bins - 1):
            raise RecipeError(f"insert_observers: bins must be a power of two >= 256, got {bins!r}.")
        self.activation_observer, self.tolerance, self.per_channel = activation_observer, float(tolerance), per_channel
        self.bits = _bits(bits, "bits")
        self.weight_bits = _bits(weight_bits, "weight_bits") if weight_bits is not None else None
        self.activation_bits = _bits(activation_bits, "activation_bits") if activation_bits is not None else None
        self.unsigned_after_relu, self.quantize_add_inputs = unsigned_after_relu, quantize_add_inputs
        self.percentile, self.bins = float(percentile), int(bins)
        self.exclude = as_patterns(self.name, "exclude", exclude)
        if mode not in ("static", "dynamic"):
            raise RecipeError(f"insert_observers: mode must be 'static' or 'dynamic', got {mode!r}.")
        self.mode = mode

    def plan_options(self) -> Options:
        return Options(activation_bits=self.activation_bits or self.bits, weight_bits=self.weight_bits or self.bits,
                       method=self.activation_observer, tolerance=self.tolerance, percentile=self.percentile,
                       bins=self.bins, per_channel=self.per_channel, unsigned_after_relu=self.unsigned_after_relu,
                       quantize_add_inputs=self.quantize_add_inputs, exclude=self.exclude, mode=self.mode)

    def verify(self, ctx: CompileContext) -> None:
        """Every planned tensor is observed by its site's observer, and every use of it reads the observed value."""
        plan: QuantPlan = ctx.plans[QuantPlan]
        nodes = {n.name: n for n in ctx.gm.graph.nodes}
        for site in plan.sites.values():
            for value in site.values:
                users = list(nodes[value].users) if value in nodes else []
                if [u.target for u in users] != [f"{HOLDER}.{site.name}"]:
                    raise VerificationError(f"[{self.name}] {value} should be read only by {HOLDER}.{site.name}; its "
                                            f"users are {[u.name for u in users]}.")

    def run(self, ctx: CompileContext) -> PassResult:
        gm = ctx.gm
        refuse_quantized(gm, self.name, "Quantize a model once; to change the quantization, compile the float "
                                        "model again with the new options.")
        check_patterns(self.name, "exclude", self.exclude, [n for n, _ in gm.named_modules() if n])
        wide = next((k for k, t in [*gm.named_parameters(), *gm.named_buffers()] if t.dtype == torch.float64), None)
        if wide is not None or any(t.dtype == torch.float64 for t in ctx.example_inputs):
            raise InputError(f"[{self.name}] the model computes in float64 ({wide or 'its inputs'}); quantization "
                             f"simulates ONNX Runtime's float32 arithmetic. Compile model.float() with float32 inputs.")
        expanded = expand_low_bit_layers(gm)  # weight-shared layers quantize as their plain layers
        given = replayed(ctx, QuantPlan, self.name)
        plan = given if given is not None else plan_quantization(gm, self.plan_options())
        ctx.plans[QuantPlan] = plan
        nodes = {n.name: n for n in gm.graph.nodes}
        holder = nn.Module()
        if plan.sites:
            gm.add_submodule(HOLDER, holder)
        for site in plan.sites.values():
            holder.add_module(site.name, Observer(site.spec))
            for value in site.values:
                node = nodes[value]
                with gm.graph.inserting_after(node):
                    obs = gm.graph.call_module(f"{HOLDER}.{site.name}", (node,))
                node.replace_all_uses_with(obs, delete_user_cb=lambda user, obs=obs: user is not obs)
                obs.meta[meta.TENSOR] = node.meta[meta.TENSOR]
                meta.add_provenance(obs, self.name, f"observes {value} for {site.reason}")
        notes = tuple(f"left float: {why}" for why in plan.float_ops.values())
        stats = plan.summary() | ({"replayed": True} if given is not None else {})
        if expanded:
            stats["codebook_layers_expanded"] = len(expanded)
        return PassResult(modified=bool(plan.sites or expanded), stats=stats, notes=notes)
