"""Search strategies for per-group channel counts under a budget.

A strategy receives a :class:`Problem`: the width space (candidate groups and the counts each may lose), a cost
(predicted seconds from the measured latency model, or the MAC or parameter fraction) with its budget, each group's
estimated loss at each of its widths, and optionally a quality function of a plan (higher is better: the user's
``eval_fn`` or the SQNR of the outputs, ``plan_quality``).  It returns a plan (one count per group) whose cost is
within the budget.

- ``uniform``: one share of every group, the smallest that meets the budget (the baseline).
- ``knapsack`` (HALP, Shen et al. 2022): channels are items, the loss their removal causes the (negative) value
  and the latency they cost the weight; a multiple-choice knapsack per budget keeps, in each group, its most
  important channels first.  A layer's latency depends on the widths of two groups (its input and output), so the
  weights are each group's marginal latency with the other groups at the current solution, and the knapsack is
  solved again around each solution until it stops changing.  HALP's Taylor scores estimate the loss of each
  channel; here the loss of a group at each width is measured (``distortion``): the noise power its removal adds to
  the model's outputs on the calibration data, relative to their power.  Noise from independent cuts adds, so the
  total is the sum over groups that the knapsack needs; it sees what scores cannot (a residual stream cut to a
  quarter of its width costs far more than the same share of a branch's channels).  Without data the loss is the
  square of the share of the group's l1 importance removed (``share_loss``): magnitudes do not compare across
  layers, and a loss linear in the share would empty the layers whose channels cost the most time.
- ``sensitivity`` (PaddleSlim): every group pruned alone over a ladder of shares and scored; a loss threshold gives
  every group the share where its loss reaches it (interpolated between the measured shares, as PaddleSlim's
  ``get_ratios_by_loss``), and a binary search on the threshold meets the budget.
- ``netadapt`` (NetAdapt, Yang et al. 2018) and ``anneal`` (NNI's SimulatedAnnealingPruner): see their functions.
Independent evaluations (sensitivity's, NetAdapt's proposals) are split across processes under ``torchrun``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from fxcompress.passes.pruning.lib.width_space import WidthSpace

from fxcompress.errors import InputError


@dataclasses.dataclass
class Problem:
    space: WidthSpace
    cost: Callable[[list[int]], float]  # in the budget's unit
    budget: float
    loss: list[np.ndarray]  # per group: the loss at each of its levels (0 at level 0), additive across groups
    quality: Callable[[list[int]], float] | None = None  # higher is better
    seed: int = 0
    evaluations: int = 200  # how many plans the quality function may score
    log: Callable[[str], None] = lambda message: None
    info: dict = dataclasses.field(default_factory=dict)  # what the strategy reports (stats)
    floor: list[int] | None = None  # the fastest plan measured (``floor_plans``), for latency budgets
    joint: Callable[[list[int]], float] | None = None  # the quality of a whole plan that picks among the knapsack's
    # finalists (higher is better; the SQNR its loss is measured with)

    def __post_init__(self) -> None:
        cost, memo = self.cost, {}

        def cached(removed: list[int]) -> float:  # searches revisit plans; the cost is a pure function of the plan
            key = tuple(removed)
            if key not in memo:
                memo[key] = cost(key)
            return memo[key]
        self.cost, self._memo = cached, memo

    def forget(self) -> None:
        """Forget the costs computed so far (the cost function has learnt from a measurement)."""
        self._memo.clear()

    def feasible(self, removed: list[int]) -> bool:
        return self.cost(removed) <= self.budget

    def nearest(self, share: float | np.ndarray) -> list[int]:
        return self.space.nearest(share)

    def cheapest(self, *plans: list[int]) -> list[int]:
        """The least costly of ``plans`` and the floor: what a strategy returns when nothing it found meets the
        budget (the plan that misses it by the least)."""
        return list(min([*plans, *([self.floor] if self.floor is not None else [])], key=self.cost))

    def need_quality(self, strategy: str) -> Callable[[list[int]], float]:
        if self.quality is None:
            raise InputError(f"strategy {strategy!r} scores candidate plans: give calibration_data (its outputs' "
                             f"SQNR is the score) or an eval_fn.")
        return self.quality


def share_loss(scores: torch.Tensor, space: WidthSpace) -> list[np.ndarray]:
    """The data-free loss: per group, the square of the share of the group's importance that each level removes
    (its channels' scores summed, over the group's total).  Magnitude scores do not compare across layers; shares
    do, and their squares charge a deep cut of one group more than small cuts of many."""
    out = []
    for grp, lv in zip(space.groups, space.levels):
        s = scores[grp.units].double().clamp_min(0)
        s = s / s.sum().clamp_min(1e-12)
        rank = space.unit_rank[grp.units]
        order = torch.argsort(rank)  # removal order
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(s[order], 0)])
        out.append(cum[torch.tensor(lv)].numpy() ** 2)
    return out


SMALL_NOISE = 0.25  # relative noise power (6 dB SQNR) up to which the noise of separate cuts is taken to add
STEEP = 20.0  # how much more each unit of noise past SMALL_NOISE is charged


def distortion(space: WidthSpace, sqnr: Callable[[list[int]], float], evaluations: int) -> list[np.ndarray]:
    """The measured loss: per group, the noise power that pruning the group alone to each level adds to the outputs,
    relative to their power (10^(-SQNR/10)), measured at up to ``evaluations / groups`` levels spread over its range
    (at least 3) and interpolated between them; non-decreasing in the channels removed.  Noise powers add only
    while they are small: a group's noise saturates near the output's power (the output is lost), where the sum
    would call one lost group as cheap as small cuts of every group that fine-tuning recovers from.  Noise past
    ``SMALL_NOISE`` is therefore charged ``STEEP`` times, so the knapsack cuts that deep only where nothing else
    meets the budget (ResNet-20 at 0.82 of its latency: the stage-3 residual stream, whose noise alone reaches 0.95
    of the output's power at 16 of 64 channels, is kept at 32 instead of 16)."""
    per_group = max(3, evaluations // max(1, len(space.groups)))
    measured, plans = [], []
    for g, lv in enumerate(space.levels):
        idx = sorted({*np.linspace(1, len(lv) - 1, min(per_group, len(lv) - 1)).round().astype(int).tolist()})
        measured.append(idx)
        for i in idx:
            plan = space.full()
            plan[g] = lv[i]
            plans.append(plan)
    noise = iter(10.0 ** (-np.asarray(evaluate_all(sqnr, plans)) / 10.0))
    out = []
    for lv, idx in zip(space.levels, measured):
        at = np.array([0, *idx], dtype=float)
        values = np.maximum.accumulate(np.array([0.0, *(next(noise) for _ in idx)]))
        curve = np.interp(np.arange(len(lv)), at, values)
        out.append(np.where(curve > SMALL_NOISE, SMALL_NOISE + (curve - SMALL_NOISE) * STEEP, curve))
    return out


def fastest(space: WidthSpace, cost: Callable[[list[int]], float], sweeps: int = 6) -> list[int]:
    """The plan of least cost, by coordinate descent from every group at its fewest channels: each sweep sets each
    group in turn to its cheapest level with the others fixed (on ties, the one that keeps more channels), until a
    sweep changes nothing.  Fewest channels is not fastest when kernels pack channels in blocks: ONNX Runtime's
    U8S8 convolutions with 4 output channels run slower than with 16 (96 against 59 us, a 128-wide conv on 8x8)."""
    plan = [lv[-1] for lv in space.levels]
    for _ in range(sweeps):
        changed = False
        for g, lv in enumerate(space.levels):
            before, costs = plan[g], []
            for k in lv:
                plan[g] = k
                costs.append(cost(plan))
            plan[g] = lv[int(np.argmin(costs))]  # levels go from fewest removed: argmin keeps the most channels
            changed |= plan[g] != before
        if not changed:
            break
    return plan


def floor_plans(space: WidthSpace, cost: Callable[[list[int]], float]) -> dict[str, list[int]]:
    """The candidates for the floor, to be measured (the fastest is the floor): every group at its fewest channels
    (``fewest``), the cheapest plan on ``cost`` by coordinate descent (``fastest``) and the cheapest uniform plan
    keeping multiples of the coarsest step of ``COARSER`` (``uniform``), each when it differs from those before.
    The descent stops in a local minimum of the prediction, and the prediction errs most at these narrow plans: on
    MobileNetV2 a uniform plan in multiples of 16 measured 0.73 ms where the descent's plan measured 0.82 ms."""
    plans = {"fewest": [lv[-1] for lv in space.levels]}
    candidates = {"fastest": fastest(space, cost),
                  "uniform": min(uniform_plans(space, space.round_to * COARSER[-1]), key=cost)}
    for key, plan in candidates.items():
        if plan not in plans.values():
            plans[key] = plan
    return plans


# ---- uniform -------------------------------------------------------------------------------------------------

UNIFORM_SHARES = np.arange(0.0, 1.0 + 1e-9, 0.005)  # the shares a uniform plan is chosen among


def uniform_plans(space: WidthSpace, step: int = 1) -> list[list[int]]:
    """The plan of each share in ``UNIFORM_SHARES``: every group at its level nearest to the share, keeping a
    multiple of ``step`` channels (or all of them)."""
    return [aligned(space, space.nearest(share), step) for share in UNIFORM_SHARES]


def uniform(p: Problem, step: int = 1) -> list[int]:
    """The smallest share (in steps of 0.5 %) whose plan meets the budget; when none does, the share whose plan
    costs least (not necessarily the largest: see ``fastest``).  With ``step``, each group keeps a multiple of
    ``step`` channels (or all of them), the nearest to the share."""
    plans = uniform_plans(p.space, step)
    for share, plan in zip(UNIFORM_SHARES, plans):
        if p.feasible(plan):
            p.info["share"] = round(float(share), 3)
            return plan
    p.info["fallback"] = "no uniform share meets the budget: the cheapest share's plan"
    return list(min(plans, key=p.cost))


def aligned(space: WidthSpace, plan: list[int], step: int) -> list[int]:
    """``plan`` with each group's removal moved to the nearest level that keeps a multiple of ``step`` channels
    (the unpruned level always qualifies)."""
    if step <= 1:
        return list(plan)
    out = []
    for k, lv, grp in zip(plan, space.levels, space.groups):
        ok = [j for j in lv if j == 0 or (grp.size - j) % step == 0]
        out.append(min(ok, key=lambda j: (abs(j - k), j)))
    return out


# ---- knapsack (HALP) -----------------------------------------------------------------------------------------

def _candidate_levels(p: Problem, g: int, limit: int = 32) -> list[int]:
    """The levels a knapsack considers for group ``g``: at most ``limit``, spread over its range."""
    lv = p.space.levels[g]
    if len(lv) <= limit:
        return list(range(len(lv)))
    return sorted({0, len(lv) - 1, *np.linspace(0, len(lv) - 1, limit).round().astype(int).tolist()})


def _mckp(values: list[np.ndarray], weights: list[np.ndarray], capacity: float, bins: int = 2000) -> list[int]:
    """Multiple-choice knapsack: one option per group, maximum total value, total weight <= capacity (weights
    discretised into ``bins`` steps, rounded up).  Returns the chosen option per group (None when infeasible)."""
    low = [float(w.min()) for w in weights]
    room = capacity - sum(low)
    if room < 0:
        return None
    step = room / bins if room > 0 else 1.0
    ints = [np.ceil((w - lo) / step - 1e-9).astype(int) for w, lo in zip(weights, low)]
    dp = np.full(bins + 1, -np.inf)
    dp[0] = 0.0
    choice = []
    for v, w in zip(values, ints):
        new = np.full(bins + 1, -np.inf)
        pick = np.zeros(bins + 1, dtype=int)
        for j, (vj, wj) in enumerate(zip(v, w)):
            if wj > bins:
                continue
            shifted = np.full(bins + 1, -np.inf)
            shifted[wj:] = dp[:bins + 1 - wj] + vj
            better = shifted > new
            new[better], pick[better] = shifted[better], j
        dp = new
        choice.append(pick)
    if not np.isfinite(dp).any():
        return None
    b = int(np.argmax(dp))
    out = [0] * len(values)
    for g in range(len(values) - 1, -1, -1):
        j = int(choice[g][b])
        out[g] = j
        b -= int(ints[g][j])
    return out


def _knapsack_rounds(p: Problem, base: list[int], options: list[list[int]], values: list[np.ndarray],
                     rounds: int) -> tuple[list[int] | None, float]:
    """Knapsacks linearised around ``base``, then around each solution, until it stops changing; the best
    solution whose exact cost meets the budget and its value."""
    space = p.space
    best, best_value, tighten = None, -np.inf, 1.0
    for r in range(rounds):
        weights = []
        for g, opts in enumerate(options):  # the model's cost with group g at each option, the rest at base
            trial = list(base)
            w = []
            for j in opts:
                trial[g] = space.levels[g][j]
                w.append(p.cost(trial))
            weights.append(np.array(w))
        here = p.cost(base)
        # the cost as a sum of per-group terms around base: cost(base) + sum_g (w_g - cost(base))
        capacity = p.budget * tighten - here + len(options) * here
        picked = _mckp(values, weights, capacity) if np.isfinite(here) else None
        if picked is None:
            tighten *= 0.97
            continue
        plan = [space.levels[g][opts[j]] for g, (opts, j) in enumerate(zip(options, picked))]
        cost, value = p.cost(plan), float(sum(v[j] for v, j in zip(values, picked)))
        p.log(f"knapsack round {r + 1}: predicted {cost:.6g} (budget {p.budget:.6g}), estimated loss "
              f"{-value:.4g}")
        if cost <= p.budget and value > best_value:
            best, best_value = plan, value
        if cost > p.budget:
            tighten *= min(0.99, p.budget / cost)
        elif plan == base:
            break
        base = plan
    return best, best_value


def estimated_loss(p: Problem, plan: list[int]) -> float:
    """The plan's loss as the knapsack estimates it: the sum of its groups' losses."""
    return float(sum(loss[lv.index(k)] for loss, lv, k in zip(p.loss, p.space.levels, plan)))


def polish(p: Problem, plan: list[int], steps: int = 100, max_costs: int = 4000) -> list[int]:
    """Local moves from a feasible plan while they keep it feasible and lower the estimated loss: give a group
    back its next level of channels, paying with the fewest extra channels of another group (at most
    ``max_costs`` cost evaluations in all)."""
    levels = p.space.levels
    plan, value = list(plan), -estimated_loss(p, plan)
    budget = [max_costs]

    def feasible(trial: list[int]) -> bool:
        budget[0] -= 1
        return p.feasible(trial)
    for _ in range(steps):
        if budget[0] <= 0:
            break
        best = None
        for g in range(len(plan)):
            i = levels[g].index(plan[g])
            if i == 0:
                continue
            up = list(plan)
            up[g] = levels[g][i - 1]
            if feasible(up):
                gain = -estimated_loss(p, up) - value
                if best is None or gain > best[0]:
                    best = (gain, up)
                continue
            for h in range(len(plan)):  # pay with group h's next levels
                if h == g:
                    continue
                trial = list(up)
                for k in levels[h][levels[h].index(plan[h]) + 1:][:4]:
                    trial[h] = k
                    if feasible(trial):
                        gain = -estimated_loss(p, trial) - value
                        if gain > 1e-12 and (best is None or gain > best[0]):
                            best = (gain, list(trial))
                        break
        if best is None or best[0] <= 1e-12:
            break
        value += best[0]
        plan = best[1]
    return plan


TIGHTER = (1.0, 0.95)  # the knapsack is also solved at these shares of the budget: plans with room to spare
COARSER = (2, 4)  # uniform plans keeping multiples of these times the space's step are finalists too


def _solutions(p: Problem, options: list[list[int]], bases: list[list[int]], rounds: int) -> list[list[int]]:
    """The knapsack's solutions linearised around each of ``bases`` at each share of the budget in ``TIGHTER``, and
    at each share the one of least estimated loss polished."""
    values = [-p.loss[g][opts] for g, opts in enumerate(options)]
    budget, out = p.budget, []
    try:
        for share in TIGHTER:
            p.budget = budget * share
            found = [plan for plan, _ in (_knapsack_rounds(p, base, options, values, rounds) for base in bases)
                     if plan is not None]
            if found:
                out += [*found, polish(p, min(found, key=lambda f: estimated_loss(p, f)))]
    finally:
        p.budget = budget
    return out


def knapsack(p: Problem, rounds: int = 6) -> list[int]:
    """HALP's latency knapsack, linearised around the unpruned model and around the uniform plan of the budget
    (each re-solved around its solutions), at the budget and a little under it (``TIGHTER``), the better solution
    at each polished by local exchanges.  The additive loss chooses these finalists; with them, the uniform plans of
    the budget at the space's step and at ``COARSER`` multiples of it.  The finalist kept is the one of highest
    quality measured on the whole plan when the problem has a quality function (``joint``), else of least estimated
    loss: losses measured one group at a time miss how cuts compound (on VGG-small at 0.46 of its latency, its first
    conv cut from 16 to 4 channels adds 0.07 of the output's power alone and costs 0.85 dB of SQNR on top of the
    other cuts; near the floor the knapsack's plan measured 2.52 dB where the uniform plan in multiples of 16 measured
    2.97 dB and fine-tuned 16.7 points better)."""
    options = [_candidate_levels(p, g) for g in range(len(p.space.groups))]
    start = uniform(p)
    coarse = [uniform(p, p.space.round_to * m) for m in COARSER]
    p.info.pop("share", None)
    p.info.pop("fallback", None)
    found = [start, *_solutions(p, options, [p.space.full(), start], rounds), *coarse]
    finalists = [list(f) for f in dict.fromkeys(tuple(f) for f in found) if p.feasible(list(f))]
    if not finalists:
        p.info["fallback"] = "no plan met the budget: the cheapest found"
        plan = p.cheapest(*found)
    elif p.joint is not None and len(finalists) > 1:
        scores = evaluate_all(p.joint, finalists)
        plan = finalists[int(np.argmax(scores))]
        p.info.update(finalists=len(finalists), joint_quality=round(float(max(scores)), 4))
    else:
        plan = min(finalists, key=lambda f: estimated_loss(p, f))
    p.info["estimated_loss"] = round(estimated_loss(p, plan), 6)
    return plan


# ---- sensitivity (PaddleSlim) -------------------------------------------------------------------------------

SHARES = tuple(round(0.1 * i, 1) for i in range(1, 10))


def sensitivities(p: Problem, shares: tuple[float, ...] = SHARES) -> dict[str, dict[float, float]]:
    """{group: {share: loss}}: each group pruned alone at each share, loss = quality(unpruned) - quality(plan)."""
    quality = p.need_quality("sensitivity")
    full = quality(p.space.full())
    per_group = max(1, min(len(shares), p.evaluations // max(1, len(p.space.groups))))
    if per_group < len(shares):
        shares = tuple(shares[i] for i in np.linspace(0, len(shares) - 1, per_group).round().astype(int))
    plans = []
    for g in range(len(p.space.groups)):
        for share in shares:
            plan = p.space.full()
            plan[g] = p.nearest(share)[g]
            plans.append(plan)
    losses = iter(full - q for q in evaluate_all(quality, plans))
    out = {grp.name: {share: next(losses) for share in shares} for grp in p.space.groups}
    for grp in p.space.groups:
        p.log(f"sensitivity {grp.name}: " + " ".join(f"{s:.1f}:{v:.2f}" for s, v in out[grp.name].items()))
    return out


def threshold_shares(table: dict[str, dict[float, float]], threshold: float) -> dict[str, float]:
    """PaddleSlim's ``get_ratios_by_loss``: for every group, the largest measured share whose loss stays within
    ``threshold`` (shares past a larger loss count too: losses are not always monotone), moved towards the next
    measured share by linear interpolation to where the loss reaches the threshold.  A share of 0 loses nothing."""
    out = {}
    for name, row in table.items():
        points = sorted({0.0: 0.0, **row}.items())
        for i in range(len(points) - 1, -1, -1):
            s0, l0 = points[i]
            if l0 <= threshold:
                if i + 1 < len(points) and points[i + 1][1] > l0:
                    s1, l1 = points[i + 1]
                    s0 += (threshold - l0) * (s1 - s0) / (l1 - l0)
                out[name] = s0
                break
    return out


def by_threshold(p: Problem, table: dict[str, dict[float, float]], threshold: float) -> list[int]:
    """The plan of ``threshold_shares`` (every group at its nearest level)."""
    shares = threshold_shares(table, threshold)
    return p.nearest(np.array([shares[grp.name] for grp in p.space.groups]))


def sensitivity(p: Problem) -> list[int]:
    """Sensitivities, then a binary search for the smallest loss threshold that meets the budget (the shares
    grow continuously with the threshold, so the search is on a real number, 40 halvings)."""
    table = sensitivities(p)
    p.info["sensitivities"] = {g: {str(s): round(v, 4) for s, v in row.items()} for g, row in table.items()}
    lo, hi = 0.0, max(0.0, *(v for row in table.values() for v in row.values()))
    if not p.feasible(by_threshold(p, table, hi)):
        plan = p.cheapest(by_threshold(p, table, hi), uniform(p))
        p.info["fallback"] = "every group at the largest share misses the budget: the cheapest plan"
        return plan
    if p.feasible(by_threshold(p, table, lo)):
        hi = lo
    for _ in range(40):
        if hi - lo <= 1e-9 * max(1.0, hi):
            break
        mid = (lo + hi) / 2
        if p.feasible(by_threshold(p, table, mid)):
            hi = mid
        else:
            lo = mid
    p.info["threshold"] = float(hi)
    return by_threshold(p, table, hi)


# ---- NetAdapt ------------------------------------------------------------------------------------------------

def netadapt(p: Problem, decay: float = 0.96) -> list[int]:
    """NetAdapt (Yang et al. 2018): iterations that each lower the target by a step that decays by ``decay``; in
    each, every group proposes the fewest extra channels removed that bring the plan under the target (on the
    latency model, as NetAdapt's lookup tables), every proposal is scored (after a short-term fine-tune when
    the quality function fine-tunes), and the best proposal is kept.  The steps add up to the distance from the
    unpruned cost to the budget in ``evaluations / groups`` iterations."""
    quality = p.need_quality("netadapt")
    space = p.space
    plan = space.full()
    start = p.cost(plan)
    iterations = max(2, p.evaluations // max(1, len(space.groups)))
    first = (start - p.budget) * (1 - decay) / (1 - decay ** iterations)
    target, history = start, []
    for i in range(iterations * 4):  # a step no proposal can take ends the search early; this bounds it
        if p.feasible(plan):
            break
        target = max(p.budget, target - first * decay ** min(i, iterations - 1))
        proposals = []
        for g in range(len(space.groups)):
            lv = space.levels[g]
            for k in lv[lv.index(plan[g]) + 1:]:
                trial = list(plan)
                trial[g] = k
                if p.cost(trial) <= target:
                    proposals.append(trial)
                    break
        if not proposals:  # no single group reaches the target: take the cheapest proposal of each group's next level
            proposals = [plan[:g] + [space.levels[g][space.levels[g].index(plan[g]) + 1]] + plan[g + 1:]
                         for g in range(len(space.groups)) if plan[g] != space.levels[g][-1]]
            if not proposals:
                break
            proposals = [min(proposals, key=p.cost)]
        scored = evaluate_all(quality, proposals)
        best = int(np.argmax(scored))
        changed = next(g for g, (a, b) in enumerate(zip(plan, proposals[best])) if a != b)
        plan = proposals[best]
        history.append({"target": round(float(target), 6), "cost": round(float(p.cost(plan)), 6),
                        "quality": round(float(scored[best]), 4), "group": space.groups[changed].name})
        p.log(f"netadapt {i + 1}: target {target:.6g}, {len(proposals)} proposals, best quality {scored[best]:.3f}")
    p.info["iterations"] = len(history)
    p.info["trace"] = history[-8:]
    return plan


def evaluate_all(quality: Callable[[list[int]], float], plans: list[list[int]]) -> list[float]:
    """Scores of independent plans; under ``torchrun`` each process scores its share and all of them get all."""
    rank, size = _world()
    mine = {i: quality(plan) for i, plan in enumerate(plans) if i % size == rank}
    if size == 1:
        return [mine[i] for i in range(len(plans))]
    gathered: list[dict] = [{} for _ in range(size)]
    torch.distributed.all_gather_object(gathered, mine)
    merged = {i: v for part in gathered for i, v in part.items()}
    return [merged[i] for i in range(len(plans))]


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---- simulated annealing (NNI) ----------------------------------------------------------------------------------

def _fit_budget(p: Problem, shares: np.ndarray) -> list[int]:
    """The plan of ``shares`` scaled by the smallest factor (bisection) whose plan meets the budget (NNI rescales
    its sparsities to the target; here the target is the budget)."""
    def plan(scale: float) -> list[int]:
        return p.nearest(np.clip(shares * scale, 0, 1))
    lo, hi = 0.0, 1.0 / max(float(shares.max()), 1e-9)
    if p.feasible(plan(lo)):
        return plan(lo)
    if not p.feasible(plan(hi)):
        return plan(hi)
    for _ in range(30):
        mid = (lo + hi) / 2
        if p.feasible(plan(mid)):
            hi = mid
        else:
            lo = mid
    return plan(hi)


def _by_size(p: Problem, shares: np.ndarray) -> np.ndarray:
    """NNI's ordering: the largest share to the largest group."""
    sizes = np.array([g.size for g in p.space.groups])
    out = np.empty_like(shares)
    out[np.argsort(sizes, kind="stable")] = np.sort(shares)
    return out


def anneal(p: Problem, start_temperature: float = 100.0, stop_temperature: float = 20.0, cool_down: float = 0.9,
           magnitude: float = 0.35) -> list[int]:
    """NNI's SimulatedAnnealingPruner: random shares ordered by group size and rescaled to the budget; each step
    perturbs the current shares by up to ``magnitude`` x T / T0, orders and rescales them, and accepts by
    Metropolis (better, or with probability exp(delta / T)); the best plan seen wins.  NNI cools only after an
    acceptance and loops until the temperature falls below ``stop_temperature``, which never happens when nothing
    is accepted; here every step cools and the search also ends after ``evaluations`` scored plans."""
    quality = p.need_quality("anneal")
    rng = np.random.default_rng(p.seed)
    n = len(p.space.groups)
    shares = _by_size(p, rng.uniform(0, 1, n))
    plan = _fit_budget(p, shares)
    current = quality(plan)
    best, best_value = (plan, current) if p.feasible(plan) else (None, -np.inf)
    temperature, steps, accepted = start_temperature, 0, 0
    while temperature > stop_temperature and steps < p.evaluations:
        scale = magnitude * temperature / start_temperature
        trial_shares = _by_size(p, np.clip(shares + rng.uniform(-scale, scale, n), 0, 1))
        trial = _fit_budget(p, trial_shares)
        value = quality(trial) if p.feasible(trial) else -np.inf  # a plan no rescaling fits is never taken
        steps += 1
        delta = value - current
        if delta > 0 or rng.uniform() < np.exp(delta / temperature):
            shares, plan, current = trial_shares, trial, value
            accepted += 1
            if value > best_value:
                best, best_value = trial, value
        temperature *= cool_down
        p.log(f"anneal step {steps}: T {temperature:.1f}, quality {value:.3f} (best {best_value:.3f})")
    p.info.update(steps=steps, accepted=accepted, best_quality=round(float(best_value), 4))
    if best is None:
        plan = p.cheapest(uniform(p))
        p.info["fallback"] = "no annealed plan met the budget: the cheapest plan"
        return plan
    return best


# strategies that score candidate plans (need eval_fn or calibration data)
SCORED = ("sensitivity", "netadapt", "anneal")

STRATEGIES: dict[str, Callable[[Problem], list[int]]] = {
    "knapsack": knapsack,
    "sensitivity": sensitivity,
    "netadapt": netadapt,
    "anneal": anneal,
    "uniform": uniform,
}
