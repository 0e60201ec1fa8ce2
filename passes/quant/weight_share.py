"""Share weights: every Conv/Linear weight becomes a small codebook and an index per weight (or block of weights).

    before:  y = conv(x)                       conv.weight: out x in x k x k, 32 bits per weight
    after:   y = conv(x)                       conv: a CodebookLayer, weight = codebook[codes]
                                               codebook: K = 2^bits codewords of block_size weights (fp32)
                                               codes: one per block, bits wide (stored packed on export)

- ``method="kmeans"`` (block_size 1): Deep Compression's scalar k-means, centroids initialised linearly between the
  smallest and the largest weight; ``bits`` (1-8, default 4) or ``centroids`` (2-256) sets K.
- ``method="pq"`` (``block_size`` d >= 2, default 4; d must divide every row of every shared weight: in x k x k
  for a conv, in for a Linear): product quantization, one codebook of K d-vectors per layer ("And the bit goes
  down"), bits / d index bits per weight.
- ``data_aware=True`` (needs calibration data): the codebook minimises the error of the layer's *outputs* on real
  inputs, ||X W - X W'|| (``lib/codebook.py``: error-compensated assignment, closed-form codebook update), with X
  the inputs the layer receives from the model whose earlier layers are already shared: layers go in graph order,
  each fitted on what the compressed model feeds it (3-d convs get plain k-means, named in the notes).

The codebook is a Parameter: ``finetune`` after this pass trains the centroids, each receiving the sum of its
weights' gradients (Deep Compression's centroid fine-tuning); the codes stay.  The sums run over thousands of
weights: use Adam (its steps do not grow with them; 1e-4 recovers the golden models in one epoch) or a plain SGD
rate divided accordingly.  ``quantize`` after it expands the
layers back to plain ones, whose weights then land on the per-channel INT8 grid (a fast variant, INT8 kernels).

Requires: nothing (calibration data for ``data_aware``).  Contract: CHANGES (a lossy compression): the stats give
every layer's weight SQNR (and output SQNR when data-aware), the model's output SQNR on the example inputs, and
bits per weight: of the codes alone, with the codebooks, and with the codes entropy-coded.
Skips (counted in stats, named in the notes): ``excluded``, ``tied_weight`` (the weight is shared with another
module), ``transposed`` (ConvTranspose), ``padding_mode`` (a conv padding other than zeros), ``functional``
(F.linear / F.conv on graph tensors).  No layer left to share is an error.
"""
from __future__ import annotations

import collections
import statistics
from typing import Any, Literal

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from fxcompress.passes.quant.calibrate import calibration_batches
from fxcompress.passes.quant.lib import codebook as cb
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from fxcompress import layer_inputs, meta
from fxcompress.context import CompileContext
from fxcompress.errors import InputError, RecipeError
from fxcompress.instruments import sqnr_db
from fxcompress.lowbit import CodebookLayer, index_bits
from fxcompress.options import as_patterns, check_patterns, matches
from fxcompress.pass_base import Contract, Pass, PassResult, refuse_quantized

SKIP_REASONS = ("excluded", "tied_weight", "transposed", "padding_mode", "functional")
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FUNCTIONAL = (F.linear, F.conv1d, F.conv2d, F.conv3d)


class WeightShare(Pass):
    """Weight sharing by k-means or product quantization (plain or data-aware)."""

    name = "weight_share"
    contract = Contract.CHANGES

    def __init__(self, bits: int | None = None, centroids: int | None = None,
                 method: Literal["kmeans", "pq"] = "kmeans", block_size: int | None = None, data_aware: bool = False,
                 iterations: int = 2, max_samples: int = 512, exclude: str | list[str] | tuple[str, ...] = (),
                 seed: int = 0):
        if bits is not None and centroids is not None:
            raise RecipeError("weight_share: give bits or centroids, not both.")
        if bits is not None and not 1 <= bits <= 8:
            raise RecipeError(f"weight_share: bits must be 1 to 8 (2 to 256 centroids), got {bits}.")
        if centroids is not None and not 2 <= centroids <= 256:
            raise RecipeError(f"weight_share: centroids must be 2 to 256 (codes are stored in at most 8 bits), "
                              f"got {centroids}.")
        if block_size is None:
            block_size = 1 if method == "kmeans" else 4
        if method == "kmeans" and block_size != 1:
            raise RecipeError(f"weight_share: method 'kmeans' shares single weights (block_size 1), got block_size "
                              f"{block_size}; use method 'pq' for blocks.")
        if method == "pq" and block_size < 2:
            raise RecipeError(f"weight_share: method 'pq' needs block_size >= 2, got {block_size}.")
        for key, value in (("iterations", iterations), ("max_samples", max_samples)):
            if value < 1:
                raise RecipeError(f"weight_share: {key} must be a positive integer, got {value}.")
        self.bits, self.centroids, self.method, self.block_size = bits, centroids, method, block_size
        self.data_aware, self.iterations, self.max_samples, self.seed = data_aware, iterations, max_samples, seed
        self.exclude = as_patterns(self.name, "exclude", exclude)
        self.k = centroids if centroids is not None else 2 ** (bits if bits is not None else 4)

    def run(self, ctx: CompileContext) -> PassResult:
        gm = ctx.gm
        refuse_quantized(gm, self.name, "Share weights before quantizing: [{\"pass\": \"weight_share\", ...}, "
                                        "{\"pass\": \"quantize\"}].")
        check_patterns(self.name, "exclude", self.exclude, [n for n, _ in gm.named_modules() if n])
        if self.data_aware and ctx.calibration_data is None:
            raise InputError("[weight_share] data_aware=True needs calibration data: pass compile(..., "
                             "calibration_data=batches), inputs shaped like the example inputs.")
        layers, skipped = candidates(gm, self.exclude)
        if not layers:
            why = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:5]) or "the model has none"
            raise InputError(f"[weight_share] no Conv or Linear layer to share ({why}). Weight sharing replaces the "
                             f"weights of nn.Linear / nn.Conv1d-3d modules the graph calls.")
        self._check_blocks(gm, layers)
        with meta.side_effect_free(gm):
            before = gm(*ctx.example_inputs)
        rows, plain = [], []
        for name in layers:
            layer = gm.get_submodule(name)
            aware = self.data_aware and layer_inputs.supported(layer)
            if self.data_aware and not aware:
                plain.append(f"{name}: plain k-means (data-aware fitting covers Linear and 1-d/2-d convs)")
            hessian = self._hessian(ctx, layer) if aware else None
            found = cb.fit(layer.weight, self.k, self.block_size, hessian, self.iterations, self.seed)
            shared = CodebookLayer(layer, found.codebook, found.codes)
            shared.train(layer.training)
            parent, _, leaf = name.rpartition(".")
            setattr(gm.get_submodule(parent), leaf, shared)
            rows.append(_row(name, layer.weight.numel(), found, len(found.codebook)))
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in layers:
                meta.add_provenance(node, self.name, f"weights shared ({self.method}, {self.k} codewords)")
        with meta.side_effect_free(gm):
            after = gm(*ctx.example_inputs)
        stats = self._stats(rows, skipped, sqnr_db(before, after))
        return PassResult(True, stats, _notes(rows, skipped) + tuple(plain))

    def _check_blocks(self, gm: torch.fx.GraphModule, layers: list[str]) -> None:
        for name in layers:
            w = gm.get_submodule(name).weight
            row = w[0].numel()
            if row % self.block_size:
                divisors = [d for d in range(2, min(row, 64) + 1) if row % d == 0][:6]
                raise RecipeError(f"[weight_share] block_size {self.block_size} does not divide the rows of {name!r} "
                                  f"({row} weights per output channel, weight {tuple(w.shape)}). Exclude it, or use "
                                  f"a block size dividing {row} (e.g. {', '.join(map(str, divisors)) or 'none'}).")

    def _hessian(self, ctx: CompileContext, layer: nn.Module) -> torch.Tensor:
        """H_g = sum of x x^T over the layer's inputs (patches for a conv) from the calibration data, per group
        (groups x cols x cols), as the current model computes them."""
        return layer_inputs.input_moments(ctx.gm, [layer], calibration_batches(ctx), self.max_samples)[0].sums

    def _stats(self, rows: list[dict], skipped: dict[str, str], output_sqnr: float) -> dict[str, Any]:
        weights = sum(r["weights"] for r in rows)
        bits = {key: sum(r[key] * r["weights"] for r in rows) / weights
                for key in ("index_bits", "bits_with_codebook", "entropy_bits_with_codebook")}
        stats: dict[str, Any] = {
            "layers_shared": len(rows), "weights_shared": weights, "method": self.method, "codewords": self.k,
            "block_size": self.block_size, "data_aware": self.data_aware,
            "bits_per_weight": round(bits["index_bits"], 4),
            "bits_per_weight_with_codebooks": round(bits["bits_with_codebook"], 4),
            "bits_per_weight_entropy_coded": round(bits["entropy_bits_with_codebook"], 4),
            "compression_of_shared_weights": round(32 / bits["bits_with_codebook"], 2),
            "min_weight_sqnr_db": round(min(r["weight_sqnr_db"] for r in rows), 2),
            "median_weight_sqnr_db": round(statistics.median(r["weight_sqnr_db"] for r in rows), 2),
            "output_sqnr_db": round(output_sqnr, 2)}
        aware = [r["output_sqnr_db"] for r in rows if r["output_sqnr_db"] is not None]
        if self.data_aware:
            stats["layers_data_aware"] = len(aware)
        if aware:
            stats["min_layer_output_sqnr_db"] = round(min(aware), 2)
        return stats | {f"skipped_{r}": sum(1 for v in skipped.values() if v.split(" ")[0] == r)
                        for r in SKIP_REASONS}


def _row(name: str, weights: int, found: cb.Fit, k: int) -> dict[str, Any]:
    d = found.codebook.shape[1]
    codes = found.codes.numel()
    stored = index_bits(k) * codes
    table = 32 * k * d
    return {"name": name, "weights": weights, "codewords": k, "index_bits": stored / weights,
            "bits_with_codebook": (stored + table) / weights,
            "entropy_bits_with_codebook": (cb.entropy_bits(found.codes, k) * codes + table) / weights,
            "weight_sqnr_db": found.weight_sqnr_db, "output_sqnr_db": found.output_sqnr_db}


def _notes(rows: list[dict], skipped: dict[str, str]) -> tuple[str, ...]:
    notes = [f"{r['name']}: {r['codewords']} codewords, {r['bits_with_codebook']:.3f} bits/weight with the codebook "
             f"({r['entropy_bits_with_codebook']:.3f} entropy-coded), weight SQNR {r['weight_sqnr_db']:.1f} dB"
             + (f", output SQNR {r['output_sqnr_db']:.1f} dB" if r["output_sqnr_db"] is not None else "")
             for r in rows]
    return tuple(notes) + tuple(f"{name}: {reason.replace('_', ' ')}" for name, reason in skipped.items())


def candidates(gm: torch.fx.GraphModule, exclude: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """The modules whose weights can be shared, in graph order, and the others with the reason."""
    order: list[str] = []
    skipped: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in order:
            m = gm.get_submodule(node.target)
            if isinstance(m, _LAYERS) or isinstance(m, _ConvTransposeNd):
                order.append(node.target)
        elif node.op == "call_function" and node.target in _FUNCTIONAL:
            skipped[node.name] = f"functional ({node.target.__name__} on graph tensors)"
    owners = collections.Counter(id(p) for m in gm.modules() for p in m.parameters(recurse=False))
    found = []
    for name in order:
        m = gm.get_submodule(name)
        if any(matches(name, e) for e in exclude):
            skipped[name] = "excluded"
        elif isinstance(m, _ConvTransposeNd):
            skipped[name] = "transposed (ConvTranspose weights are not shared)"
        elif isinstance(m, _ConvNd) and m.padding_mode != "zeros":
            skipped[name] = f"padding_mode {m.padding_mode!r} (only zero padding)"
        elif owners[id(m.weight)] > 1:
            skipped[name] = "tied_weight (the weight is shared with another module)"
        else:
            found.append(name)
    return found, skipped
