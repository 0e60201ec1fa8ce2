"""Neural architecture search on the model itself: make it an elastic supernet, train it once, search a subnet under
a budget and keep that subnet as a real smaller model.

    before:  the model, every prunable group at full width, every residual block in place
    after:   the chosen subnet: its groups' channels removed (``remove_channels``), its skipped blocks gone

1. **Supernet** (``lib/elastic.py``): every prunable channel group can run at the widths ``widths`` (fractions of
   its channels, rounded to multiples of ``align``, the runtime's kernel-friendly width), keeping its channels in
   ``criterion`` order so that a narrower subnet uses a subset of a wider one's channels; every residual block
   ``x + f(x)`` whose branch can be dropped can be skipped (``depth``: None where the model has such blocks, True
   requires them, False for widths alone).
2. **Training** (``lib/sandwich.py``): ``epochs`` of the training loop (its options are finetune's) by the sandwich
   rule: per step the largest subnet on the targets, the smallest and ``random_subnets`` random ones distilled
   from the largest's outputs.
3. **Search** (``lib/subnet_search.py``): ``strategy`` ``evolution`` (Once-for-All) or ``anneal`` (SANAS) over the
   subnets whose ``budget`` cost fits: ``{"latency": f}`` (a fraction of the model's latency measured in
   ``runtime``, ``ort-int8`` by default, at ``batch`` with ``threads``; the default is 0.5), ``{"latency_ms": t}``,
   or ``{"macs": f}`` (the layers' MACs with skipped blocks gone, a fraction of the model's).  Latency is predicted
   (``lib/subnet_latency.py``: the layer latency table for the kept layers at their widths, plus a cost per kept
   node, fitted on subnets extracted and measured in the runtime); the chosen subnet is extracted and measured beside
   the largest, and while it misses the budget less 2 % the search runs again on the refitted prediction with the
   target lowered by the miss (at most ``confirm`` measurements; of those within the budget the best scored wins).
   A budget below the smallest subnet's measured latency is refused.  ``align`` (default: 4 for a latency budget in
   ONNX Runtime, else 1) rounds the widths.  A candidate is scored by ``eval_fn`` (higher is better) or, without
   one, by the SQNR of its outputs against the largest subnet's on the scoring batches, always with its BatchNorm
   statistics re-estimated on those batches first (``calibration_data``, else the inputs of ``train_data``; at most
   ``score_batches``).
4. **Extraction**: the chosen subnet's statistics are re-estimated, its plan applied by ``remove_channels`` and its
   skipped blocks dropped: the module computes what the supernet computed with that subnet active (exactly, except
   for groups reported inexact).

Requires: train_data.  Contract: CHANGES.
Stats: groups (candidate groups), elastic_groups, blocks (skippable), the training's (finetune's), evaluations,
score, macs (kept fraction), widths (per group), skipped (blocks); for latency budgets full_ms, budget_ms,
smallest_ms, measured_ms, confirmations, fit_errors (the prediction's relative error at every subnet measured).
"""
from __future__ import annotations

import itertools
from typing import Any

import torch.distributed as dist
from fxcompress.passes.nas.lib import sandwich, subnet_search
from fxcompress.passes.nas.lib.elastic import ElasticSpace, Subnet, Supernet, drop_blocks, skippable_blocks
from fxcompress.passes.nas.lib.subnet_latency import SubnetLatency, calibration_subnets, confirmed
from fxcompress.passes.nas.lib.subnet_search import SubnetQuality
from fxcompress.passes.pruning.lib import latency, latency_model
from fxcompress.passes.pruning.lib.channel_deps import channel_graph
from fxcompress.passes.pruning.lib.width_space import PruningPlan, WidthSpace, candidate_groups
from fxcompress.passes.pruning.remove_channels import RemoveChannels
from fxcompress.passes.pruning.search_widths import check_budget
from fxcompress.passes.pruning.select_channels import CRITERIA, SCORERS
from fxcompress.passes.quant.calibrate import calibration_batches, grouped
from fxcompress.passes.train.lib import training

from fxcompress.context import CompileContext
from fxcompress.errors import InputError, RecipeError, did_you_mean
from fxcompress.options import as_patterns, check_patterns
from fxcompress.pass_base import PassResult

BUDGETS = ("latency", "latency_ms", "macs")
LATENCY_BUDGETS = ("latency", "latency_ms")


class NAS(training.TrainingPass):
    """An elastic supernet of widths and depths, trained once by the sandwich rule, searched under a budget."""

    name = "nas"

    def __init__(self, budget: dict | None = None, widths: list[float] | tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
                 depth: bool | None = None, align: int | None = None, strategy: str = "evolution",
                 criterion: str = "l1", random_subnets: int = 2, temperature: float = 1.0, population: int = 32,
                 generations: int = 10, search_steps: int = 300, score_batches: int = 8,
                 exclude: str | list[str] | tuple[str, ...] = (), runtime: str = "ort-int8", batch: int | None = None,
                 threads: int = 1, confirm: int = 3, **loop: Any):
        self.set_loop(loop)
        budget = {"latency": 0.5} if budget is None else budget  # half the measured latency unless told
        self.kind, self.value = check_budget(self.name, budget)
        if self.kind == "params":
            raise RecipeError("nas: budgets are latency, latency_ms or macs (a skipped block's parameters are not "
                              "counted by the width space); got params.")
        if runtime not in latency.RUNTIMES:
            raise RecipeError(f"nas: runtime must be one of {', '.join(latency.RUNTIMES)}, got {runtime!r}."
                              f"{did_you_mean(runtime, latency.RUNTIMES)}")
        if batch is not None and batch < 1:
            raise RecipeError(f"nas: batch must be a positive integer (or None: the example's), got {batch}.")
        self.runtime, self.batch, self.threads, self.confirm = runtime, batch, threads, confirm
        if not widths or any(not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 < w <= 1
                             for w in widths):
            raise RecipeError(f"nas: widths are fractions of each group's channels, 0 < w <= 1, got {widths!r}.")
        if strategy not in subnet_search.STRATEGIES:
            raise RecipeError(f"nas: unknown strategy {strategy!r}.{did_you_mean(strategy, subnet_search.STRATEGIES)}"
                              f" Strategies: {', '.join(subnet_search.STRATEGIES)}.")
        if criterion not in CRITERIA:
            raise RecipeError(f"nas: unknown criterion {criterion!r}.{did_you_mean(criterion, CRITERIA)}")
        if align is None:  # ORT's integer kernels take slower paths at widths off this step
            align = latency.ALIGN if self.kind in LATENCY_BUDGETS and runtime != "torch" else 1
        for option, value, low in (("align", align, 1), ("random_subnets", random_subnets, 0),
                                   ("threads", threads, 1), ("confirm", confirm, 1),
                                   ("population", population, 2), ("generations", generations, 0),
                                   ("search_steps", search_steps, 1), ("score_batches", score_batches, 1)):
            if value < low:
                raise RecipeError(f"nas: {option} must be an integer >= {low}, got {value}.")
        if not temperature > 0:
            raise RecipeError(f"nas: temperature must be a positive number, got {temperature!r}.")
        self.budget, self.widths, self.depth, self.align = dict(budget), tuple(widths), depth, align
        self.strategy, self.criterion, self.random_subnets = strategy, criterion, random_subnets
        self.temperature, self.population, self.generations = temperature, population, generations
        self.search_steps, self.score_batches = search_steps, score_batches
        self.exclude = as_patterns(self.name, "exclude", exclude)

    def run(self, ctx: CompileContext) -> PassResult:
        training.refuse_quantized(ctx.gm, self.name)
        if ctx.train_data is None:
            raise InputError("[nas] the supernet is trained on train_data: pass compile(model, inputs, recipe, "
                             "train_data=batches), an iterable of (inputs, target) pairs.")
        space = self._space(ctx)
        stats: dict[str, Any] = {"groups": len(space.groups), "elastic_groups": len(space.elastic),
                                 "blocks": len(space.blocks), "budget": dict(self.budget)}
        timing = self._timing(ctx, space, stats) if self.kind in LATENCY_BUDGETS else None  # refused before training
        if timing is None and space.macs(space.smallest()) > self.value:
            raise RecipeError(f"nas: the budget {self.budget} is below the smallest subnet's "
                              f"{space.macs(space.smallest()):.4f} of the MACs (every group at its narrowest, every "
                              f"skippable block skipped); give at least that.")
        net = Supernet(ctx.gm, space)
        stats.update(sandwich.train(ctx, net, self.loop, self.random_subnets, self.temperature, self.name))
        quality = SubnetQuality(net, self._scoring_batches(ctx), ctx.eval_fn)
        notes: list[str] = []
        if timing is not None:
            target = self.value * timing.full if self.kind == "latency" else self.value / 1e3
            best, info = confirmed(timing, quality, target, self._search, self.confirm, self.seed,
                                   relative=self.kind == "latency")
            notes.extend(info.pop("notes"))
            stats.update(info)
        else:
            best = self._search(subnet_search.Problem(space, space.macs, self.value, quality, self.seed))
        best = _agreed(best)
        quality.keep(best)
        stats.update(evaluations=len(quality.scored), score=round(quality.scored[best], 4),
                     macs=round(space.macs(best), 4), **space.describe(best))
        self._apply(ctx, space, best)
        return PassResult(modified=True, stats=stats, notes=tuple(notes))

    def _search(self, problem: subnet_search.Problem) -> Subnet:
        if self.strategy == "evolution":
            return subnet_search.evolution(problem, self.population, self.generations)
        return subnet_search.anneal(problem, self.search_steps)

    def _timing(self, ctx: CompileContext, space: ElasticSpace, stats: dict) -> SubnetLatency:
        """The latency prediction, fitted on subnets measured in the runtime; a budget below the smallest subnet's
        measured latency is refused."""
        inputs = latency_model.batched(ctx.example_inputs, self.batch)
        timing = SubnetLatency(ctx.gm, space, inputs, self.runtime, self.threads)
        seconds = timing.measure(calibration_subnets(space, self.seed))
        timing.calibrate()
        full, smallest = seconds["largest"], seconds["smallest"]
        target = self.value * full if self.kind == "latency" else self.value / 1e3
        stats.update(full_ms=round(full * 1e3, 4), smallest_ms=round(smallest * 1e3, 4))
        if smallest > target:
            raise RecipeError(f"nas: the budget {self.budget} ({target * 1e3:.3f} ms in {self.runtime}, batch "
                              f"{inputs[0].shape[0]}, {self.threads} thread(s)) is below the smallest subnet's "
                              f"{smallest * 1e3:.3f} ms (the largest takes {full * 1e3:.3f} ms); give at least "
                              f"{smallest / full:.2f} of the latency, or narrower widths.")
        return timing

    def _space(self, ctx: CompileContext) -> ElasticSpace:
        cg = channel_graph(ctx)
        check_patterns(self.name, "exclude", self.exclude, {n for n, _ in ctx.gm.named_modules() if n})
        groups = candidate_groups(cg, self.exclude)
        blocks = skippable_blocks(ctx.gm) if self.depth is not False else []
        if self.depth is True and not blocks:
            raise RecipeError("nas: depth=true, but no residual block of this model can be skipped (an add of x and "
                              "a branch that reads only x, with no other user of the branch); use depth=false.")
        if not groups and not blocks:
            raise RecipeError("nas: the model has no prunable channel group (see `fxcompress groups`) and no residual "
                              "block that can be skipped: there is no architecture to search.")
        scores = SCORERS[self.criterion](cg, ctx, {"seed": self.seed, "loss": None, "calibration_batches": 8})
        width_space = WidthSpace(cg, scores, latency.layer_shapes(ctx.gm), groups)
        return ElasticSpace(width_space, self.widths, self.align, depth=bool(blocks), blocks=blocks)

    def _scoring_batches(self, ctx: CompileContext) -> list[tuple]:
        source = calibration_batches(ctx) if ctx.calibration_data is not None else \
            (inputs for inputs, _ in training.train_batches(ctx, self.name))
        # forwards of at least 64 samples: BatchNorm re-estimated from one-sample batches misses the variance between
        # samples
        return [inputs for inputs, _ in itertools.islice(grouped(source, 64), self.score_batches)]

    def _apply(self, ctx: CompileContext, space: ElasticSpace, subnet: Subnet) -> None:
        """The subnet as the module: its channels removed, its skipped blocks dropped."""
        if any(subnet.removed):
            ctx.plans[PruningPlan] = space.plan(subnet)
            ctx.run_inner([RemoveChannels()])
        if subnet.skipped:
            drop_blocks(ctx.gm, space.blocks, subnet.skipped, ctx.example_inputs)
            ctx.invalidate()


def _agreed(subnet: Subnet) -> Subnet:
    """Under torchrun, rank 0's choice for every process (measured latencies differ from process to process)."""
    _, size = training.world()
    if size == 1:
        return subnet
    chosen = [subnet]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]
