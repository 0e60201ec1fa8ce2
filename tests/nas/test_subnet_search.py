"""Evolutionary and annealing searches over a supernet's subnets: feasible results, better than random sampling,
and an unreachable budget refused."""
from __future__ import annotations

import numpy as np
import pytest
from fxcompress.passes.nas.lib import subnet_search
from test_elastic import chain, elastic

from fxcompress.errors import RecipeError


def _problem(seed=0, budget=0.35):
    _, _, gm = chain()
    space = elastic(gm)
    rng = np.random.default_rng(123)
    weights = rng.uniform(0.5, 1.5, len(space.groups))
    bonus = {b.add: rng.uniform(0.0, 2.0) for b in space.blocks}

    def score(s):  # kept channels weighted per group, a value per kept block, and a term coupling two groups
        kept = np.array([g.size - k for g, k in zip(space.groups, s.removed)], float)
        return float(weights @ kept / 10 + sum(v for a, v in bonus.items() if a not in s.skipped)
                     + np.sqrt(kept[0] * kept[-1]) / 4)

    return subnet_search.Problem(space, space.macs, budget, score, seed)


@pytest.mark.parametrize("strategy", ["evolution", "anneal"])
def test_searches_return_feasible_subnets_better_than_random_sampling(strategy):
    for seed in range(3):
        p = _problem(seed)
        best = subnet_search.STRATEGIES[strategy](p)
        assert p.space.macs(best) <= 0.35
        baseline = _problem(seed + 10)
        sampled = max(baseline.evaluate(baseline.random()) for _ in range(len(p.scores)))
        assert p.evaluate(best) >= sampled, (strategy, seed)


def test_an_unreachable_budget_is_refused():
    with pytest.raises(RecipeError, match="below the smallest subnet"):
        _problem(budget=0.001)
