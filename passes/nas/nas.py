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
   subnets whose ``budget`` cost fits, ``{"macs": f}`` (the layers' MACs with skipped blocks gone, a fraction of the
   model's).  A candidate is scored by ``eval_fn`` (higher is better) or, without one, by the SQNR of its outputs
   against the largest subnet's on the scoring batches, always with its BatchNorm statistics re-estimated on those
   batches first (``calibration_data``, else the inputs of ``train_data``; at most ``score_batches``).
4. **Extraction**: the chosen subnet's statistics are re-estimated, its plan applied by ``remove_channels`` and its
   skipped blocks dropped: the module computes what the supernet computed with that subnet active (exactly, except
   for groups reported inexact).

Requires: train_data.  Contract: CHANGES.
Stats: groups (candidate groups), elastic_groups, blocks (skippable), the training's (finetune's), evaluations,
score, macs (kept fraction), widths (per group), skipped (blocks).
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from fxcompress.passes.nas.lib import sandwich, subnet_search
from fxcompress.passes.nas.lib.elastic import ElasticSpace, Subnet, Supernet, drop_blocks, skippable_blocks
from fxcompress.passes.pruning.lib import latency
from fxcompress.passes.pruning.lib.channel_deps import channel_graph
from fxcompress.passes.pruning.lib.plan_quality import sqnr_db
from fxcompress.passes.pruning.lib.width_space import PruningPlan, WidthSpace, candidate_groups
from fxcompress.passes.pruning.remove_channels import RemoveChannels
from fxcompress.passes.pruning.select_channels import CRITERIA, SCORERS
from fxcompress.passes.quant.calibrate import calibration_batches
from fxcompress.passes.train.lib import bn_stats, training
from torch.utils import _pytree as pytree

from fxcompress.context import CompileContext
from fxcompress.errors import InputError, RecipeError, did_you_mean
from fxcompress.options import as_patterns, check_patterns
from fxcompress.pass_base import PassResult

BUDGETS = ("macs",)


class NAS(training.TrainingPass):
    """An elastic supernet of widths and depths, trained once by the sandwich rule, searched under a budget."""

    name = "nas"

    def __init__(self, budget: dict | None = None, widths: list[float] | tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
                 depth: bool | None = None, align: int = 1, strategy: str = "evolution", criterion: str = "l1",
                 random_subnets: int = 2, temperature: float = 1.0, population: int = 32, generations: int = 10,
                 search_steps: int = 300, score_batches: int = 8, exclude: str | list[str] | tuple[str, ...] = (),
                 **loop: Any):
        self.set_loop(loop)
        budget = {"macs": 0.5} if budget is None else budget
        if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in BUDGETS:
            raise RecipeError(f"nas: budget must be a dict with one of {', '.join(BUDGETS)}, e.g. {{macs = 0.4}} "
                              f"(40 % of the model's MACs), got {budget!r}.")
        (self.kind, self.value), = budget.items()
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool) or not 0 < self.value <= 1:
            raise RecipeError(f"nas: budget {self.kind} is a fraction of the model's, 0 < {self.kind} <= 1; got "
                              f"{self.value!r}.")
        if not widths or any(not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 < w <= 1
                             for w in widths):
            raise RecipeError(f"nas: widths are fractions of each group's channels, 0 < w <= 1, got {widths!r}.")
        if strategy not in subnet_search.STRATEGIES:
            raise RecipeError(f"nas: unknown strategy {strategy!r}.{did_you_mean(strategy, subnet_search.STRATEGIES)}"
                              f" Strategies: {', '.join(subnet_search.STRATEGIES)}.")
        if criterion not in CRITERIA:
            raise RecipeError(f"nas: unknown criterion {criterion!r}.{did_you_mean(criterion, CRITERIA)}")
        for option, value, low in (("align", align, 1), ("random_subnets", random_subnets, 0),
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
        net = Supernet(ctx.gm, space)
        stats: dict[str, Any] = {"groups": len(space.groups), "elastic_groups": len(space.elastic),
                                 "blocks": len(space.blocks), "budget": dict(self.budget)}
        stats.update(sandwich.train(ctx, net, self.loop, self.random_subnets, self.temperature, self.name))
        batches = self._scoring_batches(ctx)
        quality = SubnetQuality(net, batches, ctx.eval_fn)
        problem = subnet_search.Problem(space, space.macs, self.value, quality, self.seed)
        if self.strategy == "evolution":
            best = subnet_search.evolution(problem, self.population, self.generations)
        else:
            best = subnet_search.anneal(problem, self.search_steps)
        quality.keep(best)
        stats.update(evaluations=len(problem.scores), score=round(problem.scores[best], 4),
                     macs=round(space.macs(best), 4), **space.describe(best))
        self._apply(ctx, space, best)
        return PassResult(modified=True, stats=stats)

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
        return list(itertools.islice(source, self.score_batches))

    def _apply(self, ctx: CompileContext, space: ElasticSpace, subnet: Subnet) -> None:
        """The subnet as the module: its channels removed, its skipped blocks dropped."""
        if any(subnet.removed):
            ctx.plans[PruningPlan] = space.plan(subnet)
            ctx.run_inner([RemoveChannels()])
        if subnet.skipped:
            drop_blocks(ctx.gm, space.blocks, subnet.skipped, ctx.example_inputs)
            ctx.invalidate()


class SubnetQuality:
    """Scores subnets of ``net``: BatchNorm statistics re-estimated on ``batches`` for each, then ``eval_fn(net)``
    or the SQNR (dB) of the outputs against the largest subnet's.  ``keep`` leaves a subnet active with its own
    statistics; until then the trained statistics are restored after every score."""

    def __init__(self, net: Supernet, batches: list[tuple], eval_fn=None):
        self.net, self.batches, self.eval_fn = net, batches, eval_fn
        self.norms = bn_stats.tracked_norms(net)
        self.saved = {name: [b.detach().clone() for b in m.buffers()] for name, m in self.norms.items()}
        self.reference = None
        if eval_fn is None:
            self.reference = self._outputs(net.space.largest())

    def _activate(self, subnet: Subnet) -> None:
        self.net.activate(subnet)
        if self.norms:
            bn_stats.reestimate(self.net, self.norms, self.batches)
        self.net.eval()

    def _outputs(self, subnet: Subnet) -> torch.Tensor:
        self._activate(subnet)
        with torch.no_grad():
            outs = [self.net(*b) for b in self.batches]
        return torch.cat([t.detach().float().flatten() for t in pytree.tree_leaves(outs)
                          if isinstance(t, torch.Tensor) and t.is_floating_point()])

    def _restore(self) -> None:
        with torch.no_grad():
            for name, m in self.norms.items():
                for b, old in zip(m.buffers(), self.saved[name]):
                    b.copy_(old)

    def __call__(self, subnet: Subnet) -> float:
        try:
            if self.eval_fn is None:
                return sqnr_db(self.reference, self._outputs(subnet))
            self._activate(subnet)
            with torch.no_grad():
                return float(self.eval_fn(self.net))
        finally:
            self._restore()

    def keep(self, subnet: Subnet) -> None:
        self._activate(subnet)
