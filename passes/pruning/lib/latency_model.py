"""A whole model's latency in a runtime: measured, and predicted for any width plan from the layer table.

Measured: the module as the runtime will run it (``ort-int8``: BatchNorm folded and lowered by ``quantize``, exported
as QDQ, which ONNX Runtime fuses into integer kernels; ``ort-fp32``: exported as it is; ``torch``: the module),
timed as the median of runs alternated with the other contenders (``timing.alternated_latency``).

Predicted: the layers' times from the latency table at the widths the plan gives them, plus what the layers do not
cover: the other nodes (residual adds, pooling, concatenation), whose time follows the size of their activations,
and the runtime's fixed cost per run:

    T(plan) = a * (sum over layers of table(layer, cin, cout)) + c + v * volume(plan)

``a``, ``c`` and ``v`` are fitted (least squares) on measured runs of the model at a few plans (``calibrate``:
uniformly and randomly pruned ones; the unpruned model is predicted as measured).  ``a`` is how a layer's time
inside the model differs from its time alone: alone, its weights are cold in the cache (the sweeps alternate many
layers), inside a small model they stay warm from run to run (ResNet-20 fp32: 41 us per 64-channel conv inside, 57 us
alone).

The table's surface is separable (a layer's time along its input width times its time along its output width), and
a layer alone is not the layer inside the model: in ResNet-20 INT8 (batch 8) a 16->16 conv on 32x32 maps runs 175 us
inside the model and 208 us alone, and 4->4 costs more than 16->16 inside (190 us) while the table calls it cheaper
(189 us).  So in ONNX Runtime every measured plan is also profiled (``profile_layers``: the layers' own kernels in
ORT's profiler, mapped to the layers by their weights' names) and each layer's table time is scaled by the ratio
measured inside the model at the nearest widths profiled, which gives way to the layer's typical ratio farther from
them (``Predictor.observe``, ``Predictor.layer``).  A search measures the plans it chooses and profiles them too: the
prediction becomes exact where the search goes.
"""
from __future__ import annotations

import math
import re
import statistics
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import torch
import torch.fx
from fxcompress.passes.pruning.lib import width_search
from fxcompress.passes.pruning.lib.latency import (
    LatencyTable,
    LayerShape,
    kernel_events,
)
from fxcompress.passes.pruning.lib.width_space import PruningTargets, WidthSpace

from fxcompress import pass_manager
from fxcompress.errors import InputError
from fxcompress.export.onnx import export_onnx
from fxcompress.export.ort import session
from fxcompress.meta import side_effect_free
from fxcompress.plans import graph_signature
from fxcompress.timing import alternated_latency

QUANTIZE = [{"pass": "quantize"}]  # what ort-int8 runs: the default lowering of the quantize shorthand


def batched(inputs: tuple, batch: int | None) -> tuple:
    """The example inputs at batch ``batch`` (their first sample repeated), or as they are for None."""
    if batch is None:
        return inputs
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise InputError(f"batch must be a positive integer, got {batch!r}.")
    if any(not t.dim() for t in inputs):
        raise InputError("batch: the example inputs have no batch dimension to resize.")
    return tuple(torch.cat([t[:1]] * batch) for t in inputs)


def lowered(gm: torch.fx.GraphModule, runtime: str, inputs: tuple) -> torch.fx.GraphModule:
    """``gm`` as ``runtime`` runs it (quantized for ort-int8, calibrated on ``inputs``: ranges do not change the
    kernels ONNX Runtime picks); a copy, ``gm`` is not touched."""
    if runtime != "ort-int8":
        return gm
    pm = pass_manager.PassManager(QUANTIZE, verify=False, check_honesty=False)
    ctx = pm.resume(gm, inputs, calibration_data=[inputs])
    pm.run(ctx)
    return ctx.gm.eval()


def onnx_bytes(gm: torch.fx.GraphModule, inputs: tuple) -> bytes:
    with tempfile.TemporaryDirectory(prefix="fxcompress-measure-") as tmp:
        path = export_onnx(gm, inputs, Path(tmp) / "model.onnx")
        return path.read_bytes()


def prepared(gm: torch.fx.GraphModule, runtime: str, inputs: tuple) -> torch.fx.GraphModule | bytes:
    """What ``runtime`` runs: the serialized ONNX model for ORT (QDQ for ort-int8), the module for torch."""
    module = lowered(gm, runtime, inputs)
    return module if runtime == "torch" else onnx_bytes(module, inputs)


def runner(model: torch.fx.GraphModule | bytes, inputs: tuple, threads: int = 1) -> Callable[[], object]:
    """A function that runs a ``prepared`` model once on ``inputs``."""
    if isinstance(model, torch.nn.Module):
        def run_torch() -> object:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with torch.no_grad(), side_effect_free(model):
                    return model(*inputs)
            finally:
                torch.set_num_threads(previous)
        return run_torch
    sess = session(model, threads=threads, spinning=False)
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return lambda: sess.run(None, feed)


def measure(models: dict, inputs: tuple, threads: int = 1, runs: int = 30) -> dict:
    """Median seconds per run of each ``prepared`` model (``{key: model}``), alternated run by run."""
    return alternated_latency({key: runner(m, inputs, threads) for key, m in models.items()}, runs, warmup=5)


class Predictor:
    """Predicted seconds of the model under a width plan (see the module docstring)."""

    NEAR = 0.1  # relative width distance over which an observed inside/alone ratio gives way to the layer's typical

    def __init__(self, table: LatencyTable, space: WidthSpace, shapes: dict[str, LayerShape]):
        self.space, self.shapes = space, shapes
        self.curves = {name: table.curve(shape) for name, shape in shapes.items()}
        self.scale, self.const, self.per_volume = 1.0, 0.0, 0.0
        self.unpruned: float | None = None  # the unpruned model's measured seconds, when calibrated with it
        self.fitted: list[dict] = []  # the measured points of the fit, with their residuals
        self.observed: dict[str, dict[tuple[int, int], float]] = {}  # layer -> {(cin, cout): inside / alone}
        self._typical: dict[str, float] = {}  # layer -> median log ratio over its observations
        self._layer_memo: dict[tuple[str, int, int], float] = {}  # searches ask for the same widths many times

    def observe(self, removed: Iterable[int], layer_seconds: dict[str, float]) -> None:
        """Record the layers' seconds measured inside the model pruned to ``removed`` (``profile_layers``): each
        layer's table time is scaled from now on by the ratio observed at the nearest widths (the latest
        observation at the same widths replaces an earlier one)."""
        widths = self.space.widths(list(removed))
        self._layer_memo.clear()
        for name, seconds in layer_seconds.items():
            if name not in self.curves or seconds <= 0:
                continue
            alone = self.curves[name](*widths[name])
            if alone > 0:
                ratio = min(max(seconds / alone, RATIO_BOUNDS[0]), RATIO_BOUNDS[1])
                seen = self.observed.setdefault(name, {})
                seen[widths[name]] = ratio
                self._typical[name] = statistics.median(math.log(r) for r in seen.values())

    def layer(self, name: str, cin: int, cout: int) -> float:
        """One layer's predicted seconds at (cin, cout): the table's, scaled by the ratio observed inside the model.
        Where the layer was observed at these widths, that ratio; farther away (relative distance ``d``, summed over
        both widths, to the nearest observation), the nearest ratio blended in log space with the layer's median
        ratio over all its observations, with weight ``exp(-d / NEAR)``: what the layer does inside the model at any
        width (warm weights, fused neighbours) carries over, a kernel path seen at one width does not."""
        key = (name, cin, cout)
        if key not in self._layer_memo:
            alone = self.curves[name](cin, cout)
            seen, shape = self.observed.get(name), self.shapes[name]
            if seen:
                def distance(w: tuple[int, int]) -> float:
                    return abs(w[0] - cin) / shape.cin + abs(w[1] - cout) / shape.cout
                near = min(seen, key=distance)
                weight = math.exp(-distance(near) / self.NEAR)
                alone *= math.exp(weight * math.log(seen[near]) + (1 - weight) * self._typical[name])
            self._layer_memo[key] = alone
        return self._layer_memo[key]

    def layers(self, widths: dict[str, tuple[int, int]]) -> float:
        """The layers' seconds at ``widths`` (``{layer: (cin, cout)}``)."""
        return sum(self.layer(name, *w) for name, w in widths.items())

    def terms(self, removed: Iterable[int]) -> tuple[float, float]:
        """(the layers' seconds, the other activations' volume fraction) under ``removed``."""
        removed = list(removed)
        kept = self.space.kept(removed)
        return self.layers(self.space.widths(removed, kept)), self.space.volume(removed, kept)

    def seconds(self, removed: Iterable[int]) -> float:
        """Predicted seconds under ``removed`` (infinite for a plan that empties a space)."""
        removed = list(removed)
        if not any(removed) and self.unpruned is not None:
            return self.unpruned
        if self.space.empties(removed):
            return math.inf
        layers, volume = self.terms(removed)
        return self.scale * layers + self.const + self.per_volume * volume

    def calibrate(self, points: list[tuple[list[int], float]]) -> None:
        """Fit ``a``, ``c`` and ``v`` to measured (plan, seconds) points of pruned plans by least squares
        (``a`` within ``SCALE_BOUNDS``, ``v >= 0``; else ``a`` and ``c``, else ``v`` and ``c``, else ``c``).  The
        unpruned model is no point of the fit but predicted as measured: pruning freezes the shape computations a
        model does at run time (ViT-tiny int8 loses 0.6 ms of Shape/Gather/Concat nodes with its first pruned
        channel), so it is not on the curve of the pruned plans."""
        unpruned = [seconds for removed, seconds in points if not any(removed)]
        self.unpruned = float(np.median(unpruned)) if unpruned else None
        pruned = [(removed, seconds) for removed, seconds in points if any(removed)] or points
        rows = [(*self.terms(removed), seconds) for removed, seconds in pruned]
        layers, vol, measured = (np.array(col, float) for col in zip(*rows))
        a, v, c = fit_terms(layers, vol, measured)
        self.scale, self.const, self.per_volume = a, c, v
        self.fitted = [{"measured_ms": s * 1e3, "predicted_ms": (a * layer + c + v * vo) * 1e3, "volume": vo}
                       for layer, vo, s in rows]


def fit_terms(layers: np.ndarray, other: np.ndarray, measured: np.ndarray) -> tuple[float, float, float]:
    """(a, b, c) of ``measured = a * layers + b * other + c`` by least squares, the richest valid fit of: all three,
    ``b = 0``, ``a = 1``, else ``c`` alone (valid: ``a`` within ``SCALE_BOUNDS``, ``b >= 0``)."""
    ones = np.ones_like(other)
    a, b, c = 1.0, 0.0, float(np.mean(measured - layers))  # c alone when no richer fit is valid
    for cols in ((layers, other, ones), (layers, ones), (other, ones)):
        if len(measured) < len(cols) + (1 if len(cols) == 3 else 0):
            continue
        target = measured if cols[0] is layers else measured - layers
        fit, *_ = np.linalg.lstsq(np.stack(cols, 1), target, rcond=None)
        fa = float(fit[0]) if cols[0] is layers else 1.0
        fb = float(fit[-2]) if cols[-2] is other else 0.0
        if SCALE_BOUNDS[0] <= fa <= SCALE_BOUNDS[1] and fb >= 0:
            return fa, fb, float(fit[-1])
    return a, b, c


# a fitted ``a`` past these is taken as noise, not the layers (calibration plans of a model whose every plan costs about
# the same, ResNet-20 at batch 1, fitted a = 3.3 and c = -0.9 ms): the next simpler fit is taken
SCALE_BOUNDS = (0.5, 2.0)
RATIO_BOUNDS = (0.25, 4.0)  # an observed inside/alone ratio past these is taken as a profiling accident
LAYER_OPS = ("Conv", "Gemm", "MatMul")  # the ONNX ops a Conv/Linear layer exports to


def weight_prefixes(gm: torch.fx.GraphModule, layers: Iterable[str]) -> dict[str, str]:
    """{layer node: the module path its weight lives under} (a layer module's target, or the owner of a
    functional call's weight attribute); layers whose weight is no attribute are left out."""
    nodes = {node.name: node for node in gm.graph.nodes}
    out = {}
    for name in layers:
        node = nodes[name]
        if node.op == "call_module":
            out[name] = str(node.target)
        elif len(node.args) > 1 and getattr(node.args[1], "op", None) == "get_attr":
            out[name] = str(node.args[1].target).rpartition(".")[0]
    return out


def onnx_layers(model: bytes, prefixes: dict[str, str]) -> dict[str, str]:
    """{ONNX node name: layer} for the Conv/Gemm/MatMul nodes of an exported model whose weight comes from an
    initializer under exactly one layer's module path (through DequantizeLinear and the like).  Exports that rename
    weights (folded constants) map fewer layers or none."""
    graph = onnx.load_from_string(model).graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {t.name for t in graph.initializer}

    def sources(value: str, depth: int = 0) -> list[str]:
        if value in initializers:
            return [value]
        node = producer.get(value)
        if node is None or depth > 4:
            return []
        return [s for v in node.input for s in sources(v, depth + 1)]
    out = {}
    for node in graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            continue
        names = [s.removeprefix("module.") for s in sources(node.input[1])]
        hits = {layer for layer, prefix in prefixes.items() if any(s.startswith(prefix + ".") for s in names)}
        if len(hits) == 1:
            out[node.name] = hits.pop()
    return out


def profile_layers(model: bytes, inputs: tuple, layers: dict[str, str], threads: int = 1, runs: int = 20,
                   warmup: int = 3) -> dict[str, float]:
    """Median seconds per run of each layer's kernels inside ``model`` (ONNX bytes), from ORT's profiler:
    ``layers`` maps ONNX node names (``onnx_layers``) to layers; ORT's fused nodes keep their first node's name
    with a ``_token_N`` suffix."""
    with tempfile.TemporaryDirectory(prefix="fxcompress-profile-") as tmp:
        sess = session(model, threads=threads, spinning=False, profile_prefix=Path(tmp) / "profile")
        feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
        for _ in range(warmup + runs):
            sess.run(None, feed)
        count, events = kernel_events(sess.end_profiling(), warmup)
    per_run = {layer: [0.0] * count for layer in set(layers.values())}
    for i, _, name, seconds in events:
        layer = layers.get(re.sub(r"(_token_\d+)+$", "", name))
        if layer is not None:
            per_run[layer][i] += seconds
    return {layer: statistics.median(v) for layer, v in per_run.items() if count}


def measure_plans(gm: torch.fx.GraphModule, inputs: tuple, space: WidthSpace, plans: dict[str, list[int]],
                  runtime: str, threads: int = 1, criterion: str = "l1", calibration_data: Iterable | None = None,
                  runs: int = 30, cache: dict[tuple[int, ...], object] | None = None) -> dict[str, float]:
    """Median seconds per run of ``gm`` pruned to each plan (``{key: removed}``; the unpruned plan is ``gm``
    itself), lowered for ``runtime`` and alternated run by run.  ``cache`` keeps each plan's ``prepared`` model
    between calls (a search measures the unpruned model beside every plan it confirms)."""
    graph = graph_signature(gm)
    cache = {} if cache is None else cache
    keys = {name: tuple(int(k) for k in removed) for name, removed in plans.items()}
    for key in keys.values():
        if key not in cache:
            module = pruned(gm, inputs, targets(space, key, graph), criterion, calibration_data) if any(key) else gm
            cache[key] = prepared(module, runtime, inputs)
    return measure({name: cache[key] for name, key in keys.items()}, inputs, threads, runs)


def observe_plans(predictor: Predictor, gm: torch.fx.GraphModule, inputs: tuple, plans: dict[str, list[int]],
                  cache: dict[tuple[int, ...], object], threads: int = 1) -> int:
    """Profile each plan's ``prepared`` ONNX model (from ``cache``, as ``measure_plans`` left it) and let
    ``predictor`` observe its layers inside the model; the number of layers observed in the last plan profiled (0
    when none was: the torch runtime's prepared models are modules)."""
    prefixes, found = None, 0
    for removed in plans.values():
        model = cache.get(tuple(int(k) for k in removed))
        if not isinstance(model, bytes):
            continue
        prefixes = weight_prefixes(gm, predictor.shapes) if prefixes is None else prefixes
        seconds = profile_layers(model, inputs, onnx_layers(model, prefixes), threads)
        predictor.observe(removed, seconds)
        found = len(seconds)
    return found


def measured_floor(predictor: Predictor, plans: dict[str, list[int]],
                   measure: Callable[[dict[str, list[int]]], dict[str, float]],
                   observe: Callable[[dict[str, list[int]]], int]) -> tuple[dict, dict, str, int]:
    """The fastest width plan as measured.  Every group at its fewest channels and the fastest plan on the table
    (``width_search.floor_plans``) are measured beside ``plans`` (the unpruned one, "full", among them); all are
    profiled (``observe``) and the prediction is calibrated on them; the fastest plan on the prediction that has
    seen the layers inside the model is measured too when it is new (beside the unpruned model, rescaled to the
    first runs' scale), observed, and a point of the fit.  Returns (every plan measured, their seconds, the floor's
    key, the layers observed in the first runs)."""
    space = predictor.space
    floors = width_search.floor_plans(space, predictor.seconds)
    plans = {**plans, **floors}
    seconds = measure(plans)
    observed = observe(plans)
    predictor.calibrate([(v, seconds[k]) for k, v in plans.items()])
    refined = width_search.fastest(space, predictor.seconds)
    if refined not in plans.values():
        more = measure({"full": space.full(), "refined": refined})
        plans["refined"], floors["refined"] = refined, refined
        seconds["refined"] = more["refined"] * seconds["full"] / more["full"]
        observe({"refined": refined})
        predictor.calibrate([(v, seconds[k]) for k, v in plans.items()])
    return plans, seconds, min(floors, key=seconds.__getitem__), observed


def pruned(gm: torch.fx.GraphModule, inputs: tuple, targets: PruningTargets, criterion: str = "l1",
           calibration_data: Iterable | None = None) -> torch.fx.GraphModule:
    """A copy of ``gm`` with each group's channels removed as ``targets`` count them (``select_channels`` picks
    them by ``criterion``, ``remove_channels`` removes them); ``gm`` is not touched."""
    recipe = [{"pass": "propagate_dependencies"}, {"pass": "select_channels", "criterion": criterion},
              {"pass": "remove_channels"}]
    pm = pass_manager.PassManager(recipe, verify=False, check_honesty=False)
    ctx = pm.resume(gm, inputs, calibration_data=calibration_data, plans=[targets])
    pm.run(ctx)
    return ctx.gm


def targets(space: WidthSpace, removed: Iterable[int], graph: str = "") -> PruningTargets:
    """``removed`` (one count per candidate group of ``space``) as pruning targets."""
    return PruningTargets({g.name: int(k) for g, k in zip(space.groups, removed)},
                          {g.name: g.size for g in space.cg.groups}, graph)


def random_plans(space: WidthSpace, n: int, seed: int, top: float = 0.85) -> dict[str, list[int]]:
    """``n`` plans with each group's share of channels removed drawn uniformly in [0, ``top``), at any level."""
    rng = np.random.default_rng(seed)
    return {f"plan {i}": space.nearest(rng.uniform(0, top, len(space.groups))) for i in range(n)}


def calibration_plans(space: WidthSpace, seed: int = 0, random_plans: int = 3) -> dict[str, list[int]]:
    """The plans a predictor is calibrated on: the unpruned model, every group at about 25 %, 50 % and 70 %
    removed, and ``random_plans`` plans with each group's share drawn at random."""
    rng = np.random.default_rng(seed)
    plans = {"full": space.full(), **{f"uniform {s}": space.nearest(s) for s in (0.25, 0.5, 0.7)}}
    for i in range(random_plans):
        plans[f"random {i}"] = space.nearest(rng.uniform(0, 0.8, len(space.groups)))
    return plans
