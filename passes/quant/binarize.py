"""Binary and ternary networks: Conv/Linear weights in {-alpha, +alpha} or {-alpha, 0, +alpha} per output channel.

    before:  y = conv(x)                          conv.weight: float
    after:   y = conv(x)                          conv: a LowBitLayer, W = alpha x sign(V) (binary), or
                                                  alpha x {-1, 0, +1} (ternary), from its latent float weight V
             with activations="binary":          y = (sign(x) * W) x K   (XNOR-Net: K the mean |x| over channels,
                                                  averaged over each output's receptive field)

- ``weights`` "binary" (BinaryConnect's sign, scaled per output channel by mean |W| as BWN / XNOR-Net) or "ternary"
  (TWN: zero where |V| <= ``threshold`` x mean |V| of the channel, alpha the mean |V| above it).
- ``activations`` "float" or "binary" (the layer's input binarized, XNOR-Net's scaling K, around a shift per input
  channel, set to the channel's mean on the first calibration batch (or the example inputs) and trained).
- ``keep_first_last`` (default true): the first and the last layer in graph order keep 8-bit weights (per output
  channel, round to nearest), float inputs: the layers binarizing hurts most, and the smallest.
- Training: ``finetune`` or ``distill`` (from the float model, the model given to compile) after this pass trains
  the latent weights through a straight-through estimator, clipped to the largest |W| at binarization (BinaryConnect's
  weight clipping); binary inputs pass the gradient where |x| <= 1.

Requires: nothing.  Contract: CHANGES (the model computes with its weights binarized: train it afterwards).  Stats:
layers binarized and kept at 8 bits, stored bits per weight, the share of zero weights (ternary), the output SQNR
on the example inputs.  Skips (counted, named in the notes): as ``weight_share``'s (excluded, tied weights,
ConvTranspose, padding modes other than zeros, functional layers).  A model with no layer to binarize is an error.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.fx
from fxcompress.passes.quant.calibrate import calibration_batches
from fxcompress.passes.quant.weight_share import SKIP_REASONS, candidates

from fxcompress import meta
from fxcompress.context import CompileContext
from fxcompress.errors import InputError, RecipeError
from fxcompress.instruments import sqnr_db
from fxcompress.lowbit import LowBitLayer
from fxcompress.options import as_patterns, check_patterns
from fxcompress.pass_base import Contract, Pass, PassResult, refuse_quantized

STORED_BITS = {"binary": 1, "ternary": 2, "int8": 8}


class Binarize(Pass):
    """Binary or ternary weights (and optionally binary activations) for Conv/Linear layers."""

    name = "binarize"
    contract = Contract.CHANGES

    def __init__(self, weights: Literal["binary", "ternary"] = "binary",
                 activations: Literal["float", "binary"] = "float", keep_first_last: bool = True,
                 threshold: float = 0.7, exclude: str | list[str] | tuple[str, ...] = ()):
        if not 0 < threshold < 1:
            raise RecipeError(f"binarize: threshold (ternary zeros below threshold x mean |W|) must be in (0, 1), "
                              f"got {threshold}.")
        self.weights, self.activations, self.keep_first_last = weights, activations, keep_first_last
        self.threshold = float(threshold)
        self.exclude = as_patterns(self.name, "exclude", exclude)

    def run(self, ctx: CompileContext) -> PassResult:
        gm = ctx.gm
        refuse_quantized(gm, self.name, "Binarize a float model: [{\"pass\": \"binarize\"}, ...].")
        check_patterns(self.name, "exclude", self.exclude, [n for n, _ in gm.named_modules() if n])
        layers, skipped = candidates(gm, self.exclude)
        if not layers:
            why = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:5]) or "the model has none"
            raise InputError(f"[binarize] no Conv or Linear layer to binarize ({why}). Binarizing replaces the weights "
                             f"of nn.Linear / nn.Conv1d-3d modules the graph calls.")
        edges = {layers[0], layers[-1]} if self.keep_first_last else set()
        if self.keep_first_last and len(layers) <= 2:
            raise InputError(f"[binarize] the model's only layers {', '.join(layers)} are its first and last, which "
                             f"keep_first_last keeps at 8 bits; nothing would be binarized. Set keep_first_last=false.")
        with meta.side_effect_free(gm):
            before = gm(*ctx.example_inputs)
        rows = []
        for name in layers:
            layer = gm.get_submodule(name)
            mode = "int8" if name in edges else self.weights
            low = LowBitLayer(layer, mode, self.threshold, binary_input=mode != "int8" and self.activations == "binary")
            low.train(layer.training)
            parent, _, leaf = name.rpartition(".")
            setattr(gm.get_submodule(parent), leaf, low)
            _, codes, _, _ = low.parts()
            zeros = float((codes == 1).float().mean()) if mode == "ternary" else 0.0
            rows.append({"name": name, "mode": mode, "weights": low.latent.numel(), "zeros": zeros})
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in layers:
                meta.add_provenance(node, self.name, f"{gm.get_submodule(node.target).mode} weights")
        self._centre_inputs(ctx, [gm.get_submodule(n) for n in layers])
        with meta.side_effect_free(gm):
            after = gm(*ctx.example_inputs)
        notes = tuple(f"{r['name']}: {r['mode']}" + (f", {r['zeros']:.0%} zeros" if r["mode"] == "ternary" else "")
                      for r in rows)
        notes += tuple(f"{name}: {reason.replace('_', ' ')}" for name, reason in skipped.items())
        return PassResult(True, self._stats(rows, skipped, sqnr_db(before, after)), notes)

    def _centre_inputs(self, ctx: CompileContext, layers: list[LowBitLayer]) -> None:
        """Each binarized input's shift set to its channels' means, layer after layer in graph order as the
        binarized model computes them (on the first calibration batch, else the example inputs)."""
        batch = next(iter(calibration_batches(ctx)), None) if ctx.calibration_data is not None else None
        batch = ctx.example_inputs if batch is None else batch
        for layer in (m for m in layers if m.binary_input):
            seen = []
            handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
            try:
                with meta.side_effect_free(ctx.gm), torch.no_grad():
                    ctx.gm(*batch)
            finally:
                handle.remove()
            layer.centre(torch.cat([x.reshape(-1, *x.shape[1:]) for x in seen]))

    def _stats(self, rows: list[dict], skipped: dict[str, str], output_sqnr: float) -> dict[str, Any]:
        low = [r for r in rows if r["mode"] != "int8"]
        weights = sum(r["weights"] for r in rows)
        stats: dict[str, Any] = {
            "layers_binarized": len(low), "layers_8bit": len(rows) - len(low), "weights": self.weights,
            "activations": self.activations,
            "bits_per_weight": round(sum(STORED_BITS[r["mode"]] * r["weights"] for r in rows) / weights, 4),
            "output_sqnr_db": round(output_sqnr, 2)}
        if self.weights == "ternary":
            stats["zero_share"] = round(sum(r["zeros"] * r["weights"] for r in low) / sum(r["weights"] for r in low), 4)
        return stats | {f"skipped_{r}": sum(1 for v in skipped.values() if v.split(" ")[0] == r)
                        for r in SKIP_REASONS}
