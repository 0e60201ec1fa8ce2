"""Channel selection: score every channel of every group and plan which to remove (a ``PruningPlan``).

    before:  ctx.analyses[ChannelGraph]              after:  ctx.plans[PruningPlan]

Scores are summed over every member of a group (all convs, linears and parameters whose slices move with the
channel), so a residual stream is judged by all its layers.  Criteria (``CRITERIA``):
  l1, l2            magnitude of the member weight slices,
  fpgm              distance to the other filters (filters near the geometric median are redundant),
  slim              |gamma| of the group's BatchNorm/LayerNorm/GroupNorm scales,
  opt_slim          PaddleSlim's OptSlim: ``ratio`` is the share of the group's gamma^2 energy to remove; the
                    threshold is the midpoint between the last channel inside that share and the next,
  taylor            |sum(w * dL/dw)| over member slices on calibration data (loss: the output's squared norm
                    unless ``loss`` is given),
  apoz              average percentage of zeros after the group's activations on calibration data,
  mean_activation   mean |activation| on calibration data,
  random            seeded random scores.
``scope="local"`` removes ``ratio`` of each group; ``"global"`` ranks channels of all groups together (scores
normalised by each group's mean).  Counts honour ``round_to``, ``min_channels`` and grouped structure (equal
removals per conv group).  Groups whose producing module matches ``exclude`` are left whole.
A ``PruningPlan`` given to ``compile(..., plans=...)`` is applied as it is (checked against the graph) instead of
scoring again.  ``PruningTargets`` (a ratio search's per-group counts, ``auto_prune``) replace ``ratio``: each group
loses exactly its count, lowest scores first.
Requires: channel_groups.  Contract: EXACT (plans only; the module is not touched).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx
from fxcompress.passes.pruning.lib.channel_deps import (
    PRUNE_ORDER,
    ChannelGraph,
    ChannelGroup,
)
from fxcompress.passes.pruning.lib.width_space import PruningPlan, PruningTargets

from fxcompress import meta, ops
from fxcompress.context import CompileContext
from fxcompress.errors import InputError, RecipeError, VerificationError, did_you_mean
from fxcompress.fxutil import lookup
from fxcompress.options import as_patterns, check_patterns, matches
from fxcompress.pass_base import Contract, Pass, PassResult, refuse_quantized
from fxcompress.plans import graph_signature, replayed

CRITERIA = ("l1", "l2", "fpgm", "slim", "opt_slim", "taylor", "apoz", "mean_activation", "random")
DATA_CRITERIA = ("taylor", "apoz", "mean_activation")
SCOPES = ("local", "global")


# ---- scores --------------------------------------------------------------------------------------------------

def _per_channel(t: torch.Tensor, dim: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn over the rows of ``t`` flattened per slice along ``dim``."""
    return fn(t.detach().float().movedim(dim, 0).reshape(t.shape[dim], -1))


def _param_scores(cg: ChannelGraph, roles: tuple[str, ...], fn,
                  weights_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit sum of fn(slice) over parameter members with the given roles, and which units had any."""
    score = torch.zeros(cg.n_units)
    seen = torch.zeros(cg.n_units, dtype=torch.bool)
    members: dict[str, list] = {}
    for s, p in cg.rel.params.items():
        if p.role in roles and not (weights_only and not p.target.endswith("weight")):
            members.setdefault(p.target, []).append((s, p.dim))
    for target, dims in members.items():
        t = lookup(cg.gm, target)
        if fn in ("l1", "l2sq"):
            # one pass over the tensor: |w| (or w^2) summed over every dim no member indexes, then per member dim
            kept = sorted({d for _, d in dims})
            small = (t.detach().float().abs() if fn == "l1" else t.detach().float().square())
            other = [d for d in range(t.dim()) if d not in kept]
            small = small.sum(other) if other else small
            for s, d in dims:
                k = kept.index(d)
                rest = [j for j in range(small.dim()) if j != k]
                score.index_add_(0, cg.units[s], small.sum(rest) if rest else small)
                seen[cg.units[s]] = True
            continue
        for s, d in dims:
            score.index_add_(0, cg.units[s], _per_channel(t, d, fn))
            seen[cg.units[s]] = True
    if "in" in roles:
        for s, g in cg.rel.grouped_inputs.items():
            w = cg.gm.get_submodule(g.module).weight.detach().float()
            per = fn_grouped_in(w, g.groups, _ROW_FNS.get(fn, fn))
            score.index_add_(0, cg.units[s], per)
            seen[cg.units[s]] = True
    return cg.push_to_controllers(score), cg.push_to_controllers(seen, "or")


_ROW_FNS = {"l1": lambda m: m.abs().sum(1), "l2sq": lambda m: m.pow(2).sum(1)}


def fn_grouped_in(w: torch.Tensor, groups: int, fn) -> torch.Tensor:
    """Per input channel of a grouped conv: fn over the weights reading it (its block's outputs)."""
    cout, cin_g = w.shape[0], w.shape[1]
    blocks = w.reshape(groups, cout // groups, cin_g, -1).permute(0, 2, 1, 3)  # (g, cin/g, out/g, k)
    return fn(blocks.reshape(groups * cin_g, -1))


WEIGHTS = ("out", "in", "attr")


def magnitude(cg, ctx, opts, power: int) -> torch.Tensor:
    score, _ = _param_scores(cg, WEIGHTS, "l1" if power == 1 else "l2sq")
    return score if power == 1 else score.sqrt()


def fpgm(cg, ctx, opts) -> torch.Tensor:
    def dist(m: torch.Tensor) -> torch.Tensor:
        return torch.cdist(m[None], m[None])[0].sum(1) if m.shape[0] <= 4096 else m.norm(dim=1)
    score, _ = _param_scores(cg, ("out",), dist)
    return score


def slim(cg, ctx, opts, square: bool = False) -> torch.Tensor:
    score, seen = _param_scores(cg, ("norm",), "l2sq" if square else "l1", weights_only=True)
    fallback = magnitude(cg, ctx, opts, 1)
    opts["_fallback"] = seen
    return torch.where(seen, score, fallback)


def random_scores(cg, ctx, opts) -> torch.Tensor:
    return torch.rand(cg.n_units, generator=torch.Generator().manual_seed(opts["seed"]))


def _batches(ctx: CompileContext, criterion: str, limit: int):
    if ctx.calibration_data is None:
        raise RecipeError(f"select_channels: criterion {criterion!r} needs calibration_data "
                          f"(compile(..., calibration_data=...)); use l1/l2/fpgm/slim for data-free selection.")
    for i, batch in enumerate(ctx.calibration_data):
        if i >= limit:
            break
        yield batch if isinstance(batch, (tuple, list)) else (batch,)


def taylor(cg, ctx, opts) -> torch.Tensor:
    gm = ctx.gm
    params = dict(gm.named_parameters())
    saved = {k: p.requires_grad for k, p in params.items()}
    grads = {k: torch.zeros_like(p) for k, p in params.items()}
    loss_fn = opts["loss"]
    n = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in _batches(ctx, "taylor", opts["calibration_batches"]):
                gm.zero_grad(set_to_none=True)
                out = gm(*batch)
                loss = loss_fn(out) if loss_fn is not None else sum(
                    (t.float().pow(2).sum() for t in torch.utils._pytree.tree_leaves(out)
                     if isinstance(t, torch.Tensor) and t.is_floating_point()), torch.zeros(()))
                loss.backward()
                for k, p in params.items():
                    if p.grad is not None:
                        grads[k] += p.grad
                n += 1
    finally:
        gm.zero_grad(set_to_none=True)
        for k, p in params.items():
            p.requires_grad_(saved[k])
    if n == 0:
        raise InputError("select_channels: calibration_data yielded no batches for criterion 'taylor'.")
    score = torch.zeros(cg.n_units)
    for s, p in cg.rel.params.items():
        if p.target in grads and p.role in WEIGHTS:
            wg = (params[p.target].detach() * grads[p.target]).float()
            score.index_add_(0, cg.units[s], _per_channel(wg, p.dim, lambda m: m.sum(1)).abs())
    return cg.push_to_controllers(score)


class _Stats(torch.fx.Interpreter):
    def __init__(self, gm, watch: dict[str, list[int]]):
        super().__init__(gm)
        self.watch = watch
        self.zeros: dict[tuple[str, int], torch.Tensor] = {}
        self.mean: dict[tuple[str, int], torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        for d in self.watch.get(n.name, ()):
            x = out.detach().float().movedim(d, 0).reshape(out.shape[d], -1)
            key = (n.name, d)
            self.zeros[key] = self.zeros.get(key, 0) + (x == 0).float().mean(1)
            self.mean[key] = self.mean.get(key, 0) + x.abs().mean(1)
        return out


def activation_scores(cg, ctx, opts, kind: str) -> torch.Tensor:
    gm = ctx.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    watch: dict[str, list[int]] = {}
    for (owner, d) in cg.units:
        node = nodes.get(owner)
        if node is not None and ops.of_node(gm, node, "activation") and meta.tensor_info(node) is not None:
            watch.setdefault(owner, []).append(d)
    interp = _Stats(gm, watch)
    n = 0
    with meta.side_effect_free(gm):
        for batch in _batches(ctx, kind, opts["calibration_batches"]):
            interp.run(*batch)
            n += 1
    if n == 0:
        raise InputError(f"select_channels: calibration_data yielded no batches for criterion {kind!r}.")
    score = torch.zeros(cg.n_units)
    seen = torch.zeros(cg.n_units, dtype=torch.bool)
    for key, zeros in interp.zeros.items():
        value = (1 - zeros / n) if kind == "apoz" else interp.mean[key] / n
        score.index_add_(0, cg.units[key], value)
        seen[cg.units[key]] = True
    score, seen = cg.push_to_controllers(score), cg.push_to_controllers(seen, "or")
    opts["_fallback"] = seen
    return torch.where(seen, score, magnitude(cg, ctx, opts, 1))


SCORERS: dict[str, Callable[..., torch.Tensor]] = {
    "l1": lambda cg, ctx, o: magnitude(cg, ctx, o, 1),
    "l2": lambda cg, ctx, o: magnitude(cg, ctx, o, 2),
    "fpgm": fpgm,
    "slim": slim,
    "opt_slim": lambda cg, ctx, o: slim(cg, ctx, o, square=True),
    "taylor": taylor,
    "apoz": lambda cg, ctx, o: activation_scores(cg, ctx, o, "apoz"),
    "mean_activation": lambda cg, ctx, o: activation_scores(cg, ctx, o, "mean_activation"),
    "random": random_scores,
}


def _keep_every_space(cg: ChannelGraph, groups: list[ChannelGroup], removed: dict[str, tuple[int, ...]],
                      scores: torch.Tensor) -> None:
    """Give back the best channel of any space the plan would empty (one piece of a split or a slice)."""
    by_name = {g.name: g for g in groups}
    spaces = [s for s, u in cg.units.items() if u.numel()]
    if not spaces:
        return
    flat = torch.cat([cg.units[s] for s in spaces])  # every space's units, one after another
    space_of = torch.repeat_interleave(torch.arange(len(spaces)), torch.tensor([cg.units[s].numel() for s in spaces]))
    for _ in range(len(cg.units)):
        mask = torch.zeros(cg.n_units, dtype=torch.bool)
        for name, idx in removed.items():
            if idx:
                mask[by_name[name].units[torch.tensor(idx, dtype=torch.long)]] = True
        closed = cg.closure(mask)
        kept = torch.bincount(space_of[~closed[flat]], minlength=len(spaces))  # units each space keeps
        emptied = torch.nonzero(kept == 0)
        if not emptied.numel():
            return
        empty = spaces[int(emptied[0])]
        u = cg.units[empty]
        cand = u[mask[u]]
        if not cand.numel():  # emptied through a product: give back a controller
            a, b = cg.ctrl
            cand = b[torch.isin(a, u) & mask[b]]
        best = cand[torch.argmax(scores[cand])]
        grp = cg.groups[int(cg.group_of[best])]
        back = {int(cg.local[best])}
        if grp.blocks is not None:  # give one back in every block, so removals stay equal per block
            idx = torch.tensor(removed[grp.name], dtype=torch.long)
            local_scores = scores[grp.units[idx]]
            for b in range(int(grp.blocks.max()) + 1):
                mine = grp.blocks[idx] == b
                if bool(mine.any()):
                    back.add(int(idx[mine][torch.argmax(local_scores[mine])]))
        removed[grp.name] = tuple(i for i in removed[grp.name] if i not in back)


# ---- counts ---------------------------------------------------------------------------------------------------

def _count(grp: ChannelGroup, want: float, round_to: int, min_channels: int) -> int:
    """Channels to remove from a group for a wanted (fractional) number, within its constraints: a fraction rounds
    up (ratio 0.3 of 64 channels removes 20, keeps 44), so that at least the ratio asked is removed."""
    n, free = grp.size, grp.n_prunable
    keep_min = max(1, min_channels)
    k = int(math.ceil(want - 1e-6))
    if round_to > 1:
        kept = max(round_to, int(math.floor((n - want) / round_to + 0.5)) * round_to)
        k = n - kept
    k = max(0, min(k, free, n - keep_min))
    if grp.blocks is not None:
        nb = int(grp.blocks.max()) + 1
        per_block = [int((grp.prunable & (grp.blocks == b)).sum()) for b in range(nb)]
        block_size = n // nb
        target = k if round_to > 1 else min(want, k)  # per block, a fraction rounds up too
        kb = min(int(math.ceil(target / nb - 1e-6)), min(per_block), block_size - 1)
        k = max(0, kb) * nb
    return k


def _pick(grp: ChannelGroup, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k lowest-scoring prunable channels (spread equally over blocks when the group has them)."""
    s = torch.where(grp.prunable, scores, torch.full_like(scores, math.inf))
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    if grp.blocks is None:
        return torch.sort(torch.topk(s, k, largest=False).indices).values
    nb = int(grp.blocks.max()) + 1
    picked = []
    for b in range(nb):
        idx = torch.nonzero(grp.blocks == b).flatten()
        picked.append(idx[torch.topk(s[idx], k // nb, largest=False).indices])
    return torch.sort(torch.cat(picked)).values


def _opt_slim_count(energy: torch.Tensor, share: float) -> tuple[int, float]:
    """OptSlim: channels (ascending gamma^2) whose cumulative energy stays within the share; midpoint threshold."""
    e = torch.sort(energy).values
    cum = torch.cumsum(e, 0)
    k = int((cum <= share * float(cum[-1])).sum())
    k = min(k, e.numel() - 1)
    threshold = float((e[k - 1] + e[k]) / 2) if k > 0 else float(e[0]) / 2
    return k, threshold


class SelectChannels(Pass):
    """Channel selection: score channels per group and plan which to remove."""

    name = "select_channels"
    produces = (PruningPlan,)
    contract = Contract.EXACT
    requires = (ChannelGraph,)
    uses = (PruningTargets,)

    def __init__(self, criterion: str = "l1", ratio: float | dict[str, float] = 0.5, scope: str = "local",
                 round_to: int = 1, exclude: str | list[str] | tuple[str, ...] = (), min_channels: int = 1,
                 calibration_batches: int = 8, seed: int = 0, loss: Callable | None = None):
        if criterion not in CRITERIA:
            raise RecipeError(f"select_channels: unknown criterion {criterion!r}.{did_you_mean(criterion, CRITERIA)}"
                              f" Valid criteria: {', '.join(CRITERIA)}.")
        if scope not in SCOPES:
            raise RecipeError(f"select_channels: scope must be 'local' or 'global', got {scope!r}.")
        ratios = ratio.values() if isinstance(ratio, dict) else [ratio]
        for r in ratios:
            if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 <= r < 1:
                raise RecipeError(f"select_channels: ratio must be a number with 0 <= ratio < 1 (or a dict of "
                                  f"module patterns to such numbers), got {ratio!r}.")
        if scope == "global" and isinstance(ratio, dict):
            raise RecipeError("select_channels: a per-module ratio dict needs scope='local'.")
        if not isinstance(round_to, int) or round_to < 1 or not isinstance(min_channels, int) or min_channels < 1:
            raise RecipeError("select_channels: round_to and min_channels must be integers >= 1.")
        if isinstance(ratio, dict):
            as_patterns(self.name, "ratio", list(ratio))
        self.criterion, self.ratio, self.scope, self.round_to = criterion, ratio, scope, round_to
        self.exclude, self.min_channels = as_patterns(self.name, "exclude", exclude), min_channels
        self.calibration_batches, self.seed, self.loss = calibration_batches, seed, loss

    def _ratio_for(self, grp: ChannelGroup) -> float:
        if not isinstance(self.ratio, dict):
            return float(self.ratio)
        for pattern, r in self.ratio.items():
            if any(matches(m, pattern) for m in grp.modules or (grp.name,)):
                return float(r)
        return 0.0

    def run(self, ctx: CompileContext) -> PassResult:
        refuse_quantized(ctx.gm, self.name, PRUNE_ORDER)
        given = replayed(ctx, PruningPlan, self.name)
        if given is not None:
            ctx.plans[PruningPlan] = given
            removed = sum(map(len, given.removed.values()))
            return PassResult(modified=False, stats={"replayed": True, "channels_removed": removed},
                              notes=(f"applied the given plan ({given.summary()})",))
        plan, stats, notes = self.decide(ctx)
        ctx.plans[PruningPlan] = plan
        return PassResult(modified=False, stats=stats, notes=notes)

    def verify(self, ctx: CompileContext) -> None:
        """The plan names existing groups at their sizes, with valid distinct indices, and never empties a group."""
        plan: PruningPlan = ctx.plans[PruningPlan]
        groups = {g.name: g for g in ctx.analyses[ChannelGraph].groups}
        for name, idx in plan.removed.items():
            grp = groups.get(name)
            if grp is None or plan.sizes.get(name) != grp.size:
                raise VerificationError(f"[{self.name}] the plan names group {name!r}, which the graph has not at "
                                        f"{plan.sizes.get(name)} channels.")
            if len(set(idx)) != len(idx) or not all(0 <= i < grp.size for i in idx) or len(idx) >= grp.size:
                raise VerificationError(f"[{self.name}] group {name}: invalid removal {list(idx)[:8]} of {grp.size}.")
            fixed = [i for i in idx if not bool(grp.prunable[i])]
            if fixed:
                raise VerificationError(f"[{self.name}] group {name}: removes fixed channels {fixed[:8]}.")

    def decide(self, ctx: CompileContext) -> tuple[PruningPlan, dict, tuple[str, ...]]:
        """Score and choose: the plan, the stats and the notes (the module is not touched)."""
        cg: ChannelGraph = ctx.analyses[ChannelGraph]
        modules = {name for name, _ in ctx.gm.named_modules() if name}
        check_patterns(self.name, "exclude", self.exclude, modules)
        if isinstance(self.ratio, dict):
            check_patterns(self.name, "ratio", self.ratio, modules)
        opts = {"seed": self.seed, "loss": self.loss, "calibration_batches": self.calibration_batches}
        scores = SCORERS[self.criterion](cg, ctx, opts)
        candidates, excluded = [], 0
        for grp in cg.groups:
            if grp.n_prunable == 0 or grp.size < 2:
                continue
            if any(matches(m, p) for m in grp.modules for p in self.exclude):
                excluded += 1
                continue
            candidates.append(grp)
        if isinstance(self.ratio, dict):
            self._check_ratio_patterns(cg, candidates)
        targets = ctx.plans.get(PruningTargets)
        counts, thresholds = self._counts(candidates, scores) if targets is None else \
            (self._targeted(ctx, targets, candidates), {})
        removed = {g.name: tuple(_pick(g, scores[g.units], counts[g.id]).tolist()) for g in candidates}
        _keep_every_space(cg, candidates, removed, scores)
        layer_ratios = {g.name: round(len(removed[g.name]) / g.size, 4) for g in candidates}
        plan = PruningPlan(self.criterion, removed, {g.name: g.size for g in cg.groups}, graph_signature(ctx.gm))
        total = sum(g.size for g in candidates)
        n_removed = sum(len(r) for r in removed.values())
        stats = {"criterion": self.criterion, "scope": self.scope, "groups_considered": len(candidates),
                 "groups_excluded": excluded, "groups_pruned": sum(1 for r in removed.values() if r),
                 "channels": total, "channels_removed": n_removed,
                 "ratio": round(n_removed / total, 4) if total else 0.0, "layer_ratios": layer_ratios}
        if thresholds:
            stats["opt_slim_thresholds"] = thresholds
        if "_fallback" in opts:
            stats["groups_scored_by_l1_fallback"] = sum(
                1 for g in candidates if not bool(opts["_fallback"][g.units].any()))
        notes = [f"group {g.name}: inexact removal ({g.inexact[0]})" for g in candidates
                 if g.inexact and removed.get(g.name)]
        return plan, stats, tuple(notes)

    def _targeted(self, ctx: CompileContext, targets: PruningTargets, candidates: list[ChannelGroup]) -> dict[int, int]:
        """The counts a ratio search chose, checked against this graph's groups and their constraints."""
        if targets.graph and targets.graph != graph_signature(ctx.gm):
            raise RecipeError(f"{self.name}: the pruning targets were made for another graph; run the search again "
                              f"on this model.")
        by_name = {g.name: g for g in candidates}
        unknown = [name for name, k in targets.removed.items() if k and name not in by_name]
        if unknown:
            raise RecipeError(f"{self.name}: the pruning targets name {unknown[0]!r}, which is no prunable group "
                              f"here (excluded, or fixed).")
        counts = {}
        for g in candidates:
            k = int(targets.removed.get(g.name, 0))
            if _count(g, k, 1, self.min_channels) != k:
                raise RecipeError(f"{self.name}: group {g.name} cannot lose {k} of its {g.size} channels "
                                  f"(prunable {g.n_prunable}, min_channels {self.min_channels}, blocks).")
            counts[g.id] = k
        return counts

    def _check_ratio_patterns(self, cg: ChannelGraph, candidates: list[ChannelGroup]) -> None:
        """A ratio pattern that reaches no prunable group would prune nothing: say which groups it names."""
        for pattern in self.ratio:
            if any(matches(m, pattern) for g in candidates for m in g.modules or (g.name,)):
                continue
            named = [g for g in cg.groups if any(matches(m, pattern) for m in g.modules or (g.name,))]
            why = "; ".join(f"group {g.name}: {(g.fixed or ('excluded',))[0]}" for g in named[:3]) or \
                "no channel group has a member there"
            raise RecipeError(f"{self.name}: ratio pattern {pattern!r} matches no prunable group ({why}), so it "
                              f"would prune nothing. Name the layers whose output channels you want removed.")

    def _counts(self, groups: list[ChannelGroup], scores: torch.Tensor) -> tuple[dict[int, int], dict[str, float]]:
        counts, thresholds = {}, {}
        if self.criterion == "opt_slim":
            if self.scope == "global":
                energy = torch.cat([scores[g.units][g.prunable] for g in groups]) if groups else torch.zeros(1)
                _, t = _opt_slim_count(energy, float(self.ratio))
                for g in groups:
                    want = float((scores[g.units][g.prunable] < t).sum())
                    counts[g.id] = _count(g, want, self.round_to, self.min_channels)
                thresholds["global"] = t
                return counts, thresholds
            for g in groups:
                k, t = _opt_slim_count(scores[g.units][g.prunable], self._ratio_for(g))
                counts[g.id] = _count(g, k, self.round_to, self.min_channels)
                thresholds[g.name] = t
            return counts, thresholds
        if self.scope == "local":
            for g in groups:
                counts[g.id] = _count(g, self._ratio_for(g) * g.size, self.round_to, self.min_channels)
            return counts, thresholds
        # global: one threshold over scores normalised by each group's mean
        normed = [scores[g.units][g.prunable] / scores[g.units][g.prunable].mean().clamp_min(1e-12) for g in groups]
        pool = torch.cat(normed) if normed else torch.zeros(0)
        k = int(math.floor(float(self.ratio) * pool.numel() + 0.5))
        if k == 0:
            return {g.id: 0 for g in groups}, thresholds
        t = torch.kthvalue(pool, k).values
        for g, v in zip(groups, normed):
            counts[g.id] = _count(g, float((v <= t).sum()), self.round_to, self.min_channels)
        return counts, thresholds
