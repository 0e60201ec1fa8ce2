"""A subnet's latency in a runtime: measured on the extracted subnet, predicted for any subnet from the layer table.

    T(subnet) = a * (sum over kept layers of table(layer, cin, cout)) + n * (kept nodes) + c

The layers' times are the width search's (``latency_model.Predictor.layer``: the layer latency table, scaled by what
profiling saw inside the model); what depth adds is the count of graph nodes a subnet keeps, since a skipped block
takes its nodes' per-node overhead with it (ResNet-20 INT8 at batch 8: every group at a quarter of its channels
runs 0.75 of the model's time, its seven skippable blocks gone at full width 0.28).  ``a``, ``n`` and ``c`` are
fitted (least squares, ``a`` within ``SCALE_BOUNDS``, ``n >= 0``; else simpler fits) on subnets extracted and
measured in the runtime (``calibration_subnets``); every subnet measured later (a search's confirmation) is a point
of the fit too.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch.fx
from fxcompress.passes.nas.lib import subnet_search
from fxcompress.passes.nas.lib.elastic import ElasticSpace, Subnet, extract
from fxcompress.passes.pruning.lib import latency, latency_model

CALL_OPS = ("call_module", "call_function", "call_method")


class SubnetLatency:
    """Predicted and measured seconds of subnets of ``space`` over ``gm`` in ``runtime`` (module docstring)."""

    def __init__(self, gm: torch.fx.GraphModule, space: ElasticSpace, inputs: tuple, runtime: str = "ort-int8",
                 threads: int = 1, points: int = 16):
        self.gm, self.space, self.inputs, self.runtime, self.threads = gm, space, inputs, runtime, threads
        batch = inputs[0].shape[0] if inputs[0].dim() else 1
        shapes = {n: dataclasses.replace(s, batch=batch) for n, s in space.space.shapes.items()}
        table = latency.build_table(shapes.values(), runtime, threads, points)
        self.layers = latency_model.Predictor(table, space.space, shapes)
        self.calls = {n.name for n in gm.graph.nodes if n.op in CALL_OPS}
        self.block_nodes = {b.add: {*b.branch, b.add} for b in space.blocks}
        self.scale, self.per_node, self.const = 1.0, 0.0, 0.0
        self.points: list[tuple[Subnet, float]] = []
        self.prepared: dict[Subnet, object] = {}

    def features(self, subnet: Subnet) -> tuple[float, float]:
        """(the kept layers' table seconds, the kept call nodes) of ``subnet``."""
        gone = set().union(*(self.block_nodes[a] for a in subnet.skipped)) if subnet.skipped else set()
        widths = self.space.space.widths(subnet.removed)
        layers = sum(self.layers.layer(n, *w) for n, w in widths.items() if n not in gone)
        return layers, float(len(self.calls - gone))

    @property
    def full(self) -> float:
        """The largest subnet's seconds, as the first measurement of it gave them (the scale budgets refer to)."""
        return next(t for s, t in self.points if s == self.space.largest())

    def seconds(self, subnet: Subnet) -> float:
        """A measured subnet's seconds (the median of its measurements), else the prediction: a search must not
        reject, on a prediction the refit moved, a subnet measured within its budget."""
        measured = [t for s, t in self.points if s == subnet]
        return float(np.median(measured)) if measured else self.predict(subnet)

    def predict(self, subnet: Subnet) -> float:
        if self.space.space.empties(subnet.removed):
            return math.inf
        layers, nodes = self.features(subnet)
        return self.scale * layers + self.per_node * nodes + self.const

    def measure(self, subnets: dict[str, Subnet], runs: int = 30) -> dict[str, float]:
        """Measured seconds of each subnet, extracted and prepared as the runtime runs it (medians of ``runs``
        alternated); each becomes a point of the fit."""
        for s in subnets.values():
            if s not in self.prepared:
                small = extract(self.gm, self.space, s, self.inputs)
                self.prepared[s] = latency_model.prepared(small, self.runtime, self.inputs)
        seconds = latency_model.measure({k: self.prepared[s] for k, s in subnets.items()}, self.inputs,
                                        self.threads, runs)
        self.points.extend((subnets[k], v) for k, v in seconds.items())
        return seconds

    def calibrate(self) -> None:
        """Fit ``a``, ``n`` and ``c`` on every measured point (the richest valid fit wins)."""
        rows = [(*self.features(s), t) for s, t in self.points]
        layers, nodes, measured = (np.array(col, float) for col in zip(*rows))
        self.scale, self.per_node, self.const = latency_model.fit_terms(layers, nodes, measured)

    def errors(self) -> list[float]:
        """Relative error of the prediction at every measured point."""
        return [self.predict(s) / t - 1 for s, t in self.points]


def calibration_subnets(space: ElasticSpace, seed: int = 0, random: int = 3) -> dict[str, Subnet]:
    """The subnets a prediction is fitted on: the largest and smallest, every group narrowest with every block kept,
    every group at full width with every block skipped, every group at its middle choice with every other block
    skipped, and ``random`` random subnets."""
    rng = np.random.default_rng(seed)
    largest, smallest = space.largest(), space.smallest()
    middle = space.valid([c[len(c) // 2] for c in space.choices])
    out = {"largest": largest, "smallest": smallest, "narrow": Subnet(smallest.removed),
           "shallow": Subnet(largest.removed, smallest.skipped),
           "middle": Subnet(middle, tuple(b.add for b in space.blocks[::2]))}
    for i in range(random):
        out[f"random {i}"] = space.sample(rng)
    unique: dict[str, Subnet] = {}
    for k, v in out.items():  # a model without blocks has narrow == smallest, shallow == largest
        if v not in unique.values():
            unique[k] = v
    return unique


CONFIRM_RUNS = 100  # alternated runs of a chosen subnet and the largest that confirm it
CONFIRM_MARGIN = 0.02  # a subnet is confirmed when measured this much under the budget (the noise between runs)


def confirmed(timing: SubnetLatency, score: Callable[[Subnet], float], target: float,
              search: Callable[[subnet_search.Problem], Subnet], attempts: int = 3, seed: int = 0,
              relative: bool = True, known: dict[Subnet, float] | None = None) -> tuple[Subnet, dict]:
    """The best-scored subnet measured within ``target`` seconds: search on the predicted latency, extract and
    measure the chosen subnet beside the largest (``relative``: its time as a fraction of the largest's, on the
    scale of the calibration runs), refit, and while it misses the target less ``CONFIRM_MARGIN`` search again with
    the target lowered by the ratio it missed by (at most ``attempts`` measurements); of the subnets measured within
    the target the best scored wins, else the fastest measured.  ``known``: scores from earlier searches (another
    budget), where the search may start.  Returns (subnet, stats with ``notes``)."""
    space = timing.space
    full = timing.full
    aim = target * (1 - CONFIRM_MARGIN)
    # the smallest measured within the target may still be predicted a little over the aim
    problem = subnet_search.Problem(space, timing.seconds, max(aim, timing.seconds(space.smallest())), score, seed,
                                    scores=dict(known or {}))
    met: list[tuple[float, float, Subnet]] = []
    tried: dict[Subnet, float] = {}
    notes = []
    for attempt in range(attempts):
        best = search(problem)
        if best in tried:
            break
        predicted = timing.predict(best)
        both = timing.measure({"largest": space.largest(), "plan": best}, runs=CONFIRM_RUNS)
        measured = both["plan"] * full / both["largest"] if relative else both["plan"]
        tried[best] = measured
        timing.calibrate()
        notes.append(f"attempt {attempt + 1}: predicted {predicted * 1e3:.3f} ms, measured "
                     f"{measured * 1e3:.3f} ms against {aim * 1e3:.3f} ms (the budget less {CONFIRM_MARGIN:.0%})")
        if measured <= aim:
            met.append((problem.evaluate(best), -measured, best))
            break
        problem.budget = max(problem.budget * 0.99 * aim / measured, timing.seconds(space.smallest()))
    info = {"budget_ms": round(target * 1e3, 4), "confirmations": len(tried),
            "fit_errors": [round(e, 4) for e in timing.errors()], "notes": notes}
    if met:
        _, minus, best = max(met, key=lambda m: m[:2])
        return best, {**info, "measured_ms": round(-minus * 1e3, 4)}
    best = min(tried, key=tried.get)
    notes.append(f"no subnet measured within the budget in {len(tried)} measurements; the fastest of them, "
                 f"{tried[best] / target * 100 - 100:.1f} % over, is taken")
    return best, {**info, "measured_ms": round(tried[best] * 1e3, 4)}
