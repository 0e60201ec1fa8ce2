"""Gradual pruning while training: the AGP schedule (Zhu & Gupta), structured (channels) or level (single weights).

    before:  a dense model          after:  ``target`` of its channels (or weights) zeroed, trained around the zeros
    sparsity at step t:  s_t = s_f + (s_0 - s_f) * (1 - (t - t_0) / (t_1 - t_0))^3   for t_0 <= t <= t_1

The sparsity ramps from ``initial`` to ``target`` between ``start`` and ``end`` (fractions of the training steps),
cubic: fast at first, while the network is redundant, and slowly towards the end.  Every ``frequency`` steps
the masks are recomputed from the current weights; the last part of training (after ``end``) fine-tunes at the final
sparsity.  Zeroed values stay zero (masks re-applied after every step), and the masks stay in the plans for later
training passes.

``granularity="channel"`` prunes whole channels with their dependency groups, scored by ``criterion`` (any of
``select_channels``'), ``scope`` local or global, ``exclude``; it runs after ``propagate_dependencies`` and writes
the final ``pruning_plan`` and channel masks, so a following ``remove_channels`` deletes the zeroed channels.
``granularity="level"`` zeroes the smallest-magnitude weights of every Conv/Linear (``scope`` local: each layer to the
sparsity; global: one threshold over all), biases and norms untouched, for sparse kernels or a later quantization.

Options: ``finetune``'s training options and loss, plus the above.  Requires: train_data; channel granularity:
channel_groups (propagate_dependencies).  Contract: CHANGES.  Preserves: channel_groups (values change, not
the graph).
Stats: finetune's, plus granularity, target, sparsity (achieved: channels or weights zeroed), updates,
schedule (sparsity at each update).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from fxcompress.passes.pruning.lib.channel_deps import ChannelGraph
from fxcompress.passes.pruning.remove_channels import RemoveChannels
from fxcompress.passes.pruning.select_channels import (
    CRITERIA,
    SCOPES,
    PruningPlan,
    SelectChannels,
)
from fxcompress.passes.train.lib import training

from fxcompress import ops
from fxcompress.context import CompileContext
from fxcompress.errors import PassError, RecipeError
from fxcompress.options import as_patterns, check_patterns, matches
from fxcompress.pass_base import PassResult
from fxcompress.plans import ChannelMasks, WeightMasks

GRANULARITIES = ("channel", "level")


def agp(step: int, total: int, initial: float, target: float, start: float, end: float) -> float:
    """The AGP sparsity at ``step`` of ``total``: ``initial`` before ``start``, cubic to ``target`` at ``end``."""
    t0, t1 = start * total, max(end * total, start * total + 1)
    if step <= t0:
        return initial
    progress = min((step - t0) / (t1 - t0), 1.0)
    return target + (initial - target) * (1 - progress) ** 3


class GradualPrune(training.TrainingPass):
    """AGP gradual pruning during training, channels (mask mode with dependency groups) or single weights."""

    name = "gradual_prune"
    produces = (WeightMasks, PruningPlan, ChannelMasks)  # level: weight masks; channel: a plan and channel masks
    preserves = (ChannelGraph,)

    def __init__(self, target: float = 0.5, granularity: str = "channel", initial: float = 0.0, start: float = 0.0,
                 end: float = 0.75, frequency: int | None = None, criterion: str = "l1", scope: str = "local",
                 exclude: str | list[str] | tuple[str, ...] = (), round_to: int = 1, **loop: Any):
        self.set_loop(loop)
        if self.patience is not None:
            raise RecipeError("gradual_prune: patience is not available (the sparsity changes while it trains, so "
                              "epochs do not compare); use it in a finetune after gradual_prune.")
        if granularity not in GRANULARITIES:
            raise RecipeError(f"gradual_prune: granularity must be 'channel' or 'level', got {granularity!r}.")
        for key, value in (("target", target), ("initial", initial)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise RecipeError(f"gradual_prune: {key} must be a number with 0 <= {key} < 1, got {value!r}.")
        if initial > target:
            raise RecipeError(f"gradual_prune: initial ({initial}) must not exceed target ({target}).")
        if not (isinstance(start, (int, float)) and isinstance(end, (int, float)) and 0 <= start < end <= 1):
            raise RecipeError(f"gradual_prune: start and end are fractions of the steps with 0 <= start < end <= 1, "
                              f"got start={start!r}, end={end!r}.")
        if frequency is not None and (not isinstance(frequency, int) or isinstance(frequency, bool) or frequency < 1):
            raise RecipeError(f"gradual_prune: frequency must be a positive integer or None, got {frequency!r}.")
        if scope not in SCOPES:
            raise RecipeError(f"gradual_prune: scope must be 'local' or 'global', got {scope!r}.")
        if granularity == "channel" and criterion not in CRITERIA:
            raise RecipeError(f"gradual_prune: criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}.")
        self.target, self.granularity, self.initial, self.start, self.end = target, granularity, initial, start, end
        self.frequency, self.criterion, self.scope, self.round_to = frequency, criterion, scope, round_to
        self.exclude = as_patterns(self.name, "exclude", exclude)

    def run(self, ctx: CompileContext) -> PassResult:
        training.refuse_quantized(ctx.gm, self.name)
        if self.granularity == "channel" and ChannelGraph not in ctx.analyses:
            raise PassError("[gradual_prune] channel granularity needs the dependency groups: run "
                            "propagate_dependencies first (and remove_channels after, to delete the channels).")
        loss_fn = training.loss_function(self.loss, self.name)
        check_patterns(self.name, "exclude", self.exclude, [n for n, _ in ctx.gm.named_modules() if n])
        layers = self._level_layers(ctx.gm) if self.granularity == "level" else []
        history: list[float] = []

        def on_step(step: int, total: int) -> bool:
            frequency = self.frequency or max(1, total // 20)
            last = step == int(self.end * total)
            if step % frequency and not last:
                return False
            sparsity = agp(step, total, self.initial, self.target, self.start, self.end)
            if history and sparsity <= history[-1]:
                return False
            self._mask(ctx, sparsity, layers)
            history.append(round(sparsity, 4))
            return True

        def step(model: nn.Module, inputs: tuple, target: Any) -> torch.Tensor:
            return loss_fn(model(*inputs), target)

        stats = training.fit(ctx, self.name, self.loop, step, on_step=on_step)
        if not history or history[-1] < self.target:  # training stopped before the ramp's end: reach the target
            self._mask(ctx, self.target, layers)
            history.append(self.target)
        stats |= {"granularity": self.granularity, "target": self.target, "updates": len(history),
                  "schedule": history, "sparsity": round(self._achieved(ctx, layers), 4)}
        return PassResult(modified=True, stats=stats)

    def _mask(self, ctx: CompileContext, sparsity: float, layers: list[tuple[str, nn.Module]]) -> None:
        if self.granularity == "channel":
            select = SelectChannels(self.criterion, sparsity, self.scope, self.round_to, list(self.exclude))
            ctx.run_inner([select, RemoveChannels(mode="mask")])
            return
        self._level(ctx, sparsity, layers)

    def _level(self, ctx: CompileContext, sparsity: float, layers: list[tuple[str, nn.Module]]) -> None:
        masks = dict(ctx.plans.get(WeightMasks, WeightMasks({})).entries)
        weights = {name: m.weight.detach() for name, m in layers}
        if self.scope == "global":
            pool = torch.cat([w.abs().flatten() for w in weights.values()])
            k = int(sparsity * pool.numel())
            threshold = torch.kthvalue(pool, k).values if k > 0 else None
        for name, w in weights.items():
            if self.scope == "local":
                k = int(sparsity * w.numel())
                threshold = torch.kthvalue(w.abs().flatten(), k).values if k > 0 else None
            if threshold is None:
                continue
            keep = (w.abs() > threshold).to(w.dtype)
            target = f"{name}.weight"
            masks[target] = masks[target] * keep if target in masks else keep
            with torch.no_grad():
                w.mul_(masks[target])
        ctx.plans[WeightMasks] = WeightMasks(masks)

    def _level_layers(self, gm: nn.Module) -> list[tuple[str, nn.Module]]:
        layers = [(name, m) for name, m in gm.named_modules() if ops.of_module(m, "weighted")
                  and not any(matches(name, p) for p in self.exclude)]
        if not layers:
            raise PassError("[gradual_prune] level granularity found no Conv/Linear weight to sparsify "
                            "(all excluded, or none in the model).")
        return layers

    def _achieved(self, ctx: CompileContext, layers: list[tuple[str, nn.Module]]) -> float:
        if self.granularity == "level":
            total = sum(m.weight.numel() for _, m in layers)
            return sum(int((m.weight == 0).sum()) for _, m in layers) / max(total, 1)
        plan, cg = ctx.plans.get(PruningPlan), ctx.analyses[ChannelGraph]
        pruned = [g for g in cg.groups if plan is not None and plan.removed.get(g.name)]
        considered = [g for g in cg.groups if g.n_prunable > 0 and g.size >= 2]
        removed = sum(len(plan.removed[g.name]) for g in pruned)
        return removed / max(sum(g.size for g in considered), 1)
