"""Width search: how many channels each group loses, chosen under a budget of measured latency, MACs or
parameters (``PruningTargets``, which ``select_channels`` then turns into channels).

    before:  ctx.analyses[ChannelGraph]              after:  ctx.plans[PruningTargets]
    recipe shorthand:  auto_prune = propagate_dependencies + search_widths + select_channels + remove_channels

``budget`` is a dict with one key: ``latency`` (a fraction of the unpruned model's measured latency in ``runtime``),
``latency_ms``, ``macs`` or ``params`` (fractions of the model's).  For latency budgets the pass measures the
model's layers alone over their widths (the cached latency table, ``fxcompress latency``), measures the whole model
in the runtime at a few width plans and profiles them (in ONNX Runtime each layer's time inside the model corrects
its time alone) to calibrate the prediction (``latency_model``), searches on the prediction, then prunes a copy to
the chosen plan and measures it: when it misses the budget (less a 2 % margin for the noise between runs), the
search runs again, on a prediction that has learnt from the measurement and the plan's profile, with the target
lowered by the ratio it missed by (at most ``confirm`` measurements).
Strategies (``width_search``): ``knapsack`` (HALP, the default), ``sensitivity`` (PaddleSlim), ``netadapt``,
``anneal`` (NNI's simulated annealing), ``amc`` (a DDPG agent, ``lib/amc.py``), ``auto_compress`` (NNI's
AutoCompress: annealing for the counts, then ADMM-regularised training towards them on ``train_data``, ``lib/admm.py``;
the only strategy that changes the module), ``uniform``.  Strategies that score plans use ``eval_fn`` (higher is better)
or, without one, the SQNR of the outputs on the calibration data against the unpruned model (``plan_quality``);
with ``short_term_steps`` and ``train_data`` every scored plan is fine-tuned that many steps first (NetAdapt).
The knapsack's loss of a group at a width (``estimate``): ``distortion`` (default) measures it, as the noise power
that pruning the group alone adds to the outputs on the calibration data (or the example inputs), at up to
``evaluations`` plans in all; ``share`` estimates it from the criterion's scores without running the model.  The
additive loss picks the knapsack's finalists; with ``distortion`` the SQNR of each finalist as a whole picks the plan.
With ``recalibrate_bn`` (default), every plan measured or scored has its BatchNorm statistics re-estimated on the
calibration batches first (``plan_quality``): the network judged is the one ``recalibrate_bn`` and fine-tuning start
from, not one normalising with statistics of channels that are gone.
Requires: channel_groups.  Contract: EXACT (plans only; the module is not touched), CHANGES for auto_compress.
Stats: the budget in its unit, the unpruned and predicted (and measured) cost, MAC and parameter fractions, the
table's, the search's, the distortion measurement's and the confirmation's seconds, evaluations, each group's kept
width.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import onnxruntime as ort
import torch
from fxcompress.passes.pruning.lib import (
    admm,
    amc,
    latency,
    latency_model,
    width_search,
)
from fxcompress.passes.pruning.lib.channel_deps import PRUNE_ORDER, ChannelGraph
from fxcompress.passes.pruning.lib.plan_quality import PlanQuality
from fxcompress.passes.pruning.lib.width_space import (
    PruningTargets,
    WidthSpace,
    candidate_groups,
)
from fxcompress.passes.pruning.select_channels import CRITERIA, SCORERS
from fxcompress.passes.train.lib import training

from fxcompress.context import CompileContext
from fxcompress.errors import RecipeError, did_you_mean
from fxcompress.options import as_patterns, check_patterns
from fxcompress.pass_base import Contract, Pass, PassResult, refuse_quantized
from fxcompress.plans import graph_signature

STRATEGIES = {**width_search.STRATEGIES, "amc": amc.amc, "auto_compress": width_search.anneal}
SCORED = (*width_search.SCORED, "amc", "auto_compress")  # strategies that score plans (eval_fn or calibration data)
BUDGETS = ("latency", "latency_ms", "macs", "params")
LATENCY_BUDGETS = ("latency", "latency_ms")
CONFIRM_RUNS = 100  # alternated runs of the plan and the unpruned model that confirm a plan (on a shared machine a
# ResNet-20 plan confirmed at 2.10 ms in 30 runs measured 2.47 ms in a later 40-run benchmark)
CONFIRM_MARGIN = 0.02  # a plan is confirmed when measured this much under the budget: the same plan measures a few
# per cent apart in runs minutes apart (VGG-small: 0.998 of the budget in the search, 1.052 in a later benchmark)
ESTIMATES = ("distortion", "share")  # the knapsack's loss per group and width: measured, or from the scores
FLOORS = {  # the floor candidates (``latency_model.measured_floor``), as a refusal names them
    "fewest": "every group at its fewest channels",
    "fastest": "the fastest width plan on the latency table (stats fastest_kept)",
    "uniform": "the fastest uniform plan in coarse steps (stats fastest_kept)",
    "refined": "the fastest width plan predicted from the layers profiled inside the model (stats fastest_kept)",
}


def check_budget(name: str, budget: Any) -> tuple[str, float]:
    """(kind, value) of a budget dict, or a RecipeError saying what a budget looks like."""
    example = "e.g. budget = {latency = 0.6} (60 % of the measured latency), {latency_ms = 2.5}, {macs = 0.5}"
    if not isinstance(budget, dict) or len(budget) != 1:
        raise RecipeError(f"{name}: budget must be a dict with one of {', '.join(BUDGETS)}, got {budget!r}; "
                          f"{example}.")
    (kind, value), = budget.items()
    if kind not in BUDGETS:
        raise RecipeError(f"{name}: unknown budget {kind!r}.{did_you_mean(kind, BUDGETS)} Budgets: "
                          f"{', '.join(BUDGETS)}; {example}.")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise RecipeError(f"{name}: budget {kind} must be a number, got {value!r}.")
    if kind == "latency_ms" and value <= 0:
        raise RecipeError(f"{name}: budget latency_ms must be positive, got {value}.")
    if kind != "latency_ms" and not 0 < value <= 1:
        raise RecipeError(f"{name}: budget {kind} is a fraction of the unpruned model's, 0 < {kind} <= 1; "
                          f"got {value}.")
    return kind, float(value)


class SearchWidths(Pass):
    """Width search: per-group channel counts under a measured-latency, MAC or parameter budget."""

    name = "search_widths"
    produces = (PruningTargets,)
    contract = Contract.EXACT
    requires = (ChannelGraph,)
    preserves = (ChannelGraph,)  # auto_compress's training changes weights, never the graph

    def __init__(self, budget: dict | None = None, runtime: str = "ort-int8", batch: int | None = None,
                 threads: int = 1, strategy: str = "knapsack", criterion: str = "l1", seed: int = 0,
                 evaluations: int = 200, round_to: int | None = None, min_channels: int = 1,
                 exclude: str | list[str] | tuple[str, ...] = (), points: int = 16, confirm: int = 3,
                 short_term_steps: int = 0, lr: float = 0.01, admm_rounds: int = 4, admm_rho: float = 1e-2,
                 epochs: int = 1, max_steps: int | None = None, estimate: str = "distortion",
                 recalibrate_bn: bool = True):
        budget = {"latency": 0.5} if budget is None else budget  # half the measured latency unless told
        self.kind, self.value = check_budget(self.name, budget)
        if runtime not in latency.RUNTIMES:
            raise RecipeError(f"{self.name}: runtime must be one of {', '.join(latency.RUNTIMES)}, got {runtime!r}."
                              f"{did_you_mean(runtime, latency.RUNTIMES)}")
        if runtime != "torch" and "CPUExecutionProvider" not in ort.get_available_providers():
            raise RecipeError(f"{self.name}: runtime {runtime!r} needs ONNX Runtime's CPU provider, which this "
                              f"installation lacks; use runtime='torch' or install onnxruntime.")
        if strategy not in STRATEGIES:
            raise RecipeError(f"{self.name}: unknown strategy {strategy!r}."
                              f"{did_you_mean(strategy, STRATEGIES)} Strategies: "
                              f"{', '.join(STRATEGIES)}.")
        if estimate not in ESTIMATES:
            raise RecipeError(f"{self.name}: estimate must be one of {', '.join(ESTIMATES)}, got {estimate!r}."
                              f"{did_you_mean(estimate, ESTIMATES)}")
        self.estimate, self.recalibrate_bn = estimate, recalibrate_bn
        if criterion not in CRITERIA:
            raise RecipeError(f"{self.name}: unknown criterion {criterion!r}.{did_you_mean(criterion, CRITERIA)}")
        for option, value, low in (("threads", threads, 1), ("evaluations", evaluations, 1),
                                   ("round_to", 1 if round_to is None else round_to, 1),
                                   ("min_channels", min_channels, 1),
                                   ("points", points, 2), ("confirm", confirm, 0), ("seed", seed, 0),
                                   ("short_term_steps", short_term_steps, 0), ("admm_rounds", admm_rounds, 1),
                                   ("epochs", epochs, 1), ("max_steps", 1 if max_steps is None else max_steps, 1)):
            if value < low:
                raise RecipeError(f"{self.name}: {option} must be an integer >= {low}, got {value}.")
        if batch is not None and batch < 1:
            raise RecipeError(f"{self.name}: batch must be a positive integer (or None: the example's), got {batch}.")
        self.budget, self.runtime, self.batch, self.threads = budget, runtime, batch, threads
        self.strategy, self.criterion, self.seed, self.evaluations = strategy, criterion, seed, evaluations
        self.round_to, self.min_channels, self.points, self.confirm = round_to, min_channels, points, confirm
        self.exclude = as_patterns(self.name, "exclude", exclude)
        if not lr > 0 or not admm_rho > 0:
            raise RecipeError(f"{self.name}: lr and admm_rho must be positive numbers, got {lr!r}, {admm_rho!r}.")
        self.short_term_steps, self.lr, self.admm_rounds, self.admm_rho = short_term_steps, lr, admm_rounds, admm_rho
        self.epochs, self.max_steps = epochs, max_steps
        if strategy == "auto_compress":  # it trains the module towards its plan (ADMM)
            self.contract = Contract.CHANGES

    @property
    def writes_tensors(self) -> bool:
        return self.strategy == "auto_compress"

    def run(self, ctx: CompileContext) -> PassResult:
        refuse_quantized(ctx.gm, self.name, PRUNE_ORDER)
        cg: ChannelGraph = ctx.analyses[ChannelGraph]
        check_patterns(self.name, "exclude", self.exclude, {n for n, _ in ctx.gm.named_modules() if n})
        groups = candidate_groups(cg, self.exclude)
        if not groups:
            raise RecipeError(f"{self.name}: the model has no prunable channel group (see `fxcompress groups`); "
                              f"nothing to search.")
        inputs = latency_model.batched(ctx.example_inputs, self.batch)
        batch = inputs[0].shape[0] if inputs[0].dim() else 1
        shapes = {n: dataclasses.replace(s, batch=batch) for n, s in latency.layer_shapes(ctx.gm).items()}
        scores = SCORERS[self.criterion](cg, ctx, {"seed": self.seed, "loss": None, "calibration_batches": 8})
        # for a latency budget in ORT, widths that are no multiple of latency.ALIGN take slower kernel paths (they
        # cost more than the next aligned width up from 4 channels on): they are not searched
        aligned = self.kind in LATENCY_BUDGETS and self.runtime != "torch"
        round_to = self.round_to or (latency.ALIGN if aligned else 1)
        space = WidthSpace(cg, scores, shapes, groups, round_to, self.min_channels)
        stats: dict[str, Any] = {"strategy": self.strategy, "budget": dict(self.budget), "runtime": self.runtime,
                                 "groups": len(groups)}
        search = _Search(self, ctx, cg, space, scores, shapes, inputs, stats)
        removed = search.run()
        targets = latency_model.targets(space, removed, graph_signature(ctx.gm))
        ctx.plans[PruningTargets] = targets
        stats["kept"] = {g.name: g.size - k for g, k in zip(groups, removed)}
        if self.strategy == "auto_compress":
            loop = training.Loop(epochs=self.epochs, lr=self.lr, seed=self.seed, max_steps=self.max_steps)
            stats.update(admm.admm(ctx, space, removed, self.name, self.admm_rounds, self.admm_rho, loop))
        return PassResult(modified=self.strategy == "auto_compress", stats=stats, notes=tuple(search.notes))


class _Search:
    """One search: the cost and its budget, the calibration and the confirming measurements."""

    def __init__(self, p: SearchWidths, ctx: CompileContext, cg: ChannelGraph, space: WidthSpace,
                 scores: torch.Tensor, shapes: dict, inputs: tuple, stats: dict):
        self.p, self.ctx, self.cg, self.space, self.shapes, self.inputs = p, ctx, cg, space, shapes, inputs
        self.scores = scores
        self.stats, self.notes = stats, []
        self.prepared: dict[tuple[int, ...], object] = {}  # plan -> its prepared model, for measuring it again
        self.floor: list[int] | None = None  # the fastest plan measured (latency budgets) and its seconds
        self.floor_s = float("inf")
        self.predictor: latency_model.Predictor | None = None  # latency budgets: the prediction and its points
        self.points: list[tuple[list[int], float]] = []

    def _recalibration(self, quality: PlanQuality) -> None:
        self.stats["recalibrated_bn"] = len(quality.norms)
        if quality.recalibration_skipped and quality.recalibration_skipped not in self.notes:
            self.notes.append(quality.recalibration_skipped)

    def measure(self, plans: dict[str, list[int]], runs: int = 30) -> dict[str, float]:
        """Measured seconds of the model pruned to each plan, in the runtime (medians of ``runs`` alternated)."""
        return latency_model.measure_plans(self.ctx.gm, self.inputs, self.space, plans, self.p.runtime,
                                           self.p.threads, self.p.criterion, self.ctx.calibration_data, runs,
                                           self.prepared)

    def learn(self, problem: width_search.Problem, removed: list[int], seconds: float) -> None:
        """A measured plan refines the prediction: its layers profiled inside the model, its time a point of the
        fit; the searches that follow see the new costs."""
        latency_model.observe_plans(self.predictor, self.ctx.gm, self.inputs, {"plan": removed}, self.prepared,
                                    self.p.threads)
        self.points.append((list(removed), seconds))
        self.predictor.calibrate(self.points)
        problem.forget()

    def confirm(self, problem: width_search.Problem, removed: list[int], target: float, cost) -> list[int]:
        """Measure the chosen plan and search again on the prediction that has learnt from it (``learn``), until
        the search proposes a plan already measured or ``confirm`` plans were measured (twice as many while none has
        met the budget: the floor, taken when none does, is the narrowest plan of all): while plans miss the budget
        less ``CONFIRM_MARGIN``, with the target lowered by the ratio the last one missed by; when a lowered target
        meets it with more than ``CONFIRM_MARGIN`` to spare, halfway back up (bisection on the target's factor),
        or at that target again when it was the first (the plan measured cheaper than predicted, and the next search
        knows it); a plan met with less to spare ends the search.
        Of the plans measured within the budget, the best wins: by the strategy's score when it scores plans (the
        knapsack's: the SQNR of the whole plan when its loss was measured), else by the estimated loss (near the
        floor latency is flat, and the plan closest to the budget may have lost far more channels than one a little
        faster)."""
        p, stats, space = self.p, self.stats, self.space
        aim = target * (1 - CONFIRM_MARGIN)
        factor, over, under = 1.0, None, None  # the target factor tried, the last that missed, the last that met
        feasible: list[tuple[float, float, list[int], dict]] = []
        quickest = (float("inf"), removed, dict(problem.info))  # the fastest plan that missed
        measured: set[tuple[int, ...]] = set()
        for attempt in range(2 * p.confirm):
            seconds = self.measure({"full": space.full(), "plan": removed}, runs=CONFIRM_RUNS)
            # a fraction of the latency is judged against the unpruned model measured alongside, in the same runs
            rescaled = seconds["plan"] * stats["full_ms"] / 1e3 / seconds["full"]  # on the calibration runs' scale
            plan_s = rescaled if p.kind == "latency" else seconds["plan"]
            stats["confirmations"] = attempt + 1
            self.learn(problem, removed, rescaled)
            met = plan_s <= aim
            loss = width_search.estimated_loss(problem, removed)
            self.notes.append(f"attempt {attempt + 1} (target {problem.budget * 1e3:.3f} ms): measured "
                              f"{plan_s * 1e3:.3f} ms {'<=' if met else '>'} {aim * 1e3:.3f} ms (the budget less "
                              f"{CONFIRM_MARGIN:.0%}; predicted {cost(removed) * 1e3:.3f} ms, MACs "
                              f"{space.macs(removed):.3f}, estimated loss {loss:.6g})")
            measured.add(tuple(removed))
            if met:
                judge = problem.quality or problem.joint
                merit = judge(removed) if judge is not None else -loss
                feasible.append((merit, plan_s, removed, dict(problem.info)))
                under = factor
                if plan_s > aim * (1 - CONFIRM_MARGIN):
                    break  # met with little to spare: nothing more to gain
                if over is not None:
                    factor = (factor + over) / 2
                # else the same target again, on a prediction that has learnt from this plan
            else:
                if plan_s < quickest[0]:
                    quickest = (plan_s, removed, dict(problem.info))
                if "fallback" in problem.info:  # nothing met even the predicted budget: a lower target cannot help
                    break
                over = factor
                factor = (factor + under) / 2 if under is not None else factor * 0.99 * aim / plan_s
            if attempt + 1 >= (p.confirm if feasible else 2 * p.confirm):
                break
            problem.budget = aim * factor
            problem.info.clear()
            removed = STRATEGIES[p.strategy](problem)
            if tuple(removed) in measured:
                break  # the search proposes nothing it has not measured
        floor_s = self.floor_s  # measured beside the unpruned model when the search began
        if feasible:
            _, plan_s, removed, info = max(feasible, key=lambda f: f[:2])
        elif floor_s <= target:  # the floor was measured within the budget: a plan that meets it, if the narrowest
            plan_s, removed = floor_s, list(self.floor)
            info = {"fallback": "the floor: no searched plan measured within the budget"}
            self.notes.append(f"no searched plan measured within the budget in {stats['confirmations']} "
                              f"measurements (the fastest {quickest[0] / target * 100 - 100:.1f} % over); the "
                              f"floor plan, measured at {floor_s * 1e3:.3f} ms, is taken")
        else:
            plan_s, removed, info = quickest
            self.notes.append(f"no plan measured within the budget in {stats['confirmations']} measurements; "
                              f"the fastest of them is {plan_s / target * 100 - 100:.1f} % over")
        problem.info.clear()
        problem.info.update(info)
        stats["measured_ms"] = round(plan_s * 1e3, 4)
        return removed

    def run(self) -> list[int]:
        p, space, stats = self.p, self.space, self.stats
        start = time.perf_counter()
        predictor = None
        if p.kind in LATENCY_BUDGETS:
            table = latency.build_table(self.shapes.values(), p.runtime, p.threads, p.points)
            stats["table_seconds"] = round(time.perf_counter() - start, 2)
            predictor = self.predictor = latency_model.Predictor(table, space, self.shapes)
            # the floor: every group at its fewest channels, the fastest plan on the table (blocked kernels run some
            # widths slower than wider ones) and the fastest once the layers were seen inside the model, measured
            plans, seconds, floor, stats["profiled_layers"] = latency_model.measured_floor(
                predictor, latency_model.calibration_plans(space, p.seed), self.measure,
                lambda some: latency_model.observe_plans(predictor, self.ctx.gm, self.inputs, some, self.prepared,
                                                         p.threads))
            self.points = [(v, seconds[k]) for k, v in plans.items()]
            full = seconds["full"]
            target = p.value * full if p.kind == "latency" else p.value / 1e3
            self.floor, self.floor_s = plans[floor], seconds[floor]
            stats.update(full_ms=round(full * 1e3, 4), budget_ms=round(target * 1e3, 4),
                         fastest_ms=round(seconds[floor] * 1e3, 4),
                         fastest_kept={g.name: g.size - k for g, k in zip(space.groups, self.floor)})
            if seconds[floor] > target:
                raise RecipeError(
                    f"{p.name}: the budget {p.budget} ({target * 1e3:.3f} ms in {p.runtime}, batch "
                    f"{self.inputs[0].shape[0]}, {p.threads} thread(s)) is below the fastest any width plan reaches: "
                    f"{seconds[floor] * 1e3:.3f} ms with {FLOORS[floor]} (the unpruned model takes "
                    f"{full * 1e3:.3f} ms). "
                    f"Per-node overhead sets this floor; give a budget of at least {seconds[floor] / full:.2f} of "
                    f"the latency, or remove layers.")
            cost, budget = predictor.seconds, target * (1 - CONFIRM_MARGIN)
        else:
            cost, budget = (space.macs, p.value) if p.kind == "macs" else (space.params, p.value)
            fewest = cost([lv[-1] for lv in space.levels])
            if fewest > budget:
                raise RecipeError(f"{p.name}: the budget {p.budget} is below what the fewest channels reach: "
                                  f"{fewest:.4f} of the {p.kind} with every group at its fewest channels (round_to "
                                  f"{space.round_to}, min_channels {p.min_channels}); give at least that.")
        search_start = time.perf_counter()
        data = self.ctx.calibration_data or [self.ctx.example_inputs]
        sqnr = None
        if p.strategy == "knapsack" and p.estimate == "distortion":
            sqnr = PlanQuality(self.ctx.gm, self.cg, space, data, recalibrate_bn=p.recalibrate_bn)
            self._recalibration(sqnr)
            loss = width_search.distortion(space, sqnr, p.evaluations)
            stats["distortion_evaluations"] = sqnr.evaluations
            stats["distortion_seconds"] = round(time.perf_counter() - search_start, 2)
        else:
            loss = width_search.share_loss(self.scores, space)
        quality = None
        if p.strategy == "auto_compress" and self.ctx.train_data is None:
            raise RecipeError(f"{p.name}: strategy 'auto_compress' trains the model towards its plan (ADMM): give "
                              f"train_data (compile(..., train_data=...)).")
        if p.strategy in SCORED:
            train = list(training.train_batches(self.ctx, p.name)) if p.short_term_steps else None
            quality = PlanQuality(self.ctx.gm, self.cg, space, data, self.ctx.eval_fn, train=train,
                                  tune_steps=p.short_term_steps, lr=p.lr, recalibrate_bn=p.recalibrate_bn)
            self._recalibration(quality)
        problem = width_search.Problem(space, cost, budget, loss, quality, p.seed, p.evaluations, floor=self.floor,
                                       joint=sqnr)
        removed = STRATEGIES[p.strategy](problem)
        if predictor is not None and p.confirm:
            confirm_start = time.perf_counter()
            removed = self.confirm(problem, removed, target, cost)
            stats["confirm_seconds"] = round(time.perf_counter() - confirm_start, 2)
        stats["search_seconds"] = round(time.perf_counter() - search_start, 2)
        stats["predicted"] = round(cost(removed) * (1e3 if predictor else 1), 4)
        stats["macs"] = round(space.macs(removed), 4)
        stats["params"] = round(space.params(removed), 4)
        if quality is not None:
            stats["evaluations"] = quality.evaluations
        stats.update({k: v for k, v in problem.info.items()})
        stats["measured_fraction"] = round(stats["measured_ms"] / stats["full_ms"], 4) if "measured_ms" in stats \
            else None
        if predictor is not None:
            stats["fit"] = {"a": round(predictor.scale, 4), "c_ms": round(predictor.const * 1e3, 4),
                            "v_ms": round(predictor.per_volume * 1e3, 4)}
        return removed
