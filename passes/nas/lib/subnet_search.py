"""Choosing a subnet of a trained supernet under a budget: Once-for-All's evolutionary search and PaddleSlim SANAS's
simulated annealing, over the same genes (a width choice per candidate group, on/off per skippable block).

    problem = Problem(space, cost, budget, score, seed)   # cost(subnet) <= budget is feasible; higher score wins
    best = evolution(problem)      # or anneal(problem)

``cost`` is any function of a subnet (the MAC fraction, a latency prediction); candidates over the budget are
rejected before they are scored (OFA rejects by its latency table the same way).  ``score`` is typically the
accuracy of the subnet with its BatchNorm statistics re-estimated (``eval_fn``) or the agreement of its outputs
with the largest subnet's; it is cached per subnet and counted.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch
from fxcompress.passes.nas.lib.elastic import ElasticSpace, Subnet, Supernet
from fxcompress.passes.pruning.lib.plan_quality import sqnr_db
from fxcompress.passes.train.lib import bn_stats
from torch.utils import _pytree as pytree

from fxcompress.errors import RecipeError


@dataclasses.dataclass
class Problem:
    space: ElasticSpace
    cost: Callable[[Subnet], float]
    budget: float
    score: Callable[[Subnet], float]
    seed: int = 0
    tries: int = 200  # random draws per feasible candidate before giving up on a draw
    scores: dict[Subnet, float] = dataclasses.field(default_factory=dict)  # given: scored before (another budget)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        smallest = self.space.smallest()
        if self.cost(smallest) > self.budget:
            raise RecipeError(f"the budget {self.budget:.4g} is below the smallest subnet's cost "
                              f"{self.cost(smallest):.4g} (every group at its narrowest, every skippable block "
                              f"skipped); give at least that.")

    # -- genes ------------------------------------------------------------------------------------------------
    def genes(self, subnet: Subnet) -> np.ndarray:
        widths = [c.index(k) for c, k in zip(self.space.choices, subnet.removed)]
        return np.array(widths + [b.add in subnet.skipped for b in self.space.blocks], dtype=np.int64)

    def subnet(self, genes: np.ndarray) -> Subnet:
        n = len(self.space.choices)
        removed = [c[int(i)] for c, i in zip(self.space.choices, genes[:n])]
        skipped = tuple(b.add for b, on in zip(self.space.blocks, genes[n:]) if on)
        return Subnet(self.space.valid(removed), skipped)

    def _sizes(self) -> np.ndarray:
        return np.array([len(c) for c in self.space.choices] + [2] * len(self.space.blocks))

    def feasible(self, subnet: Subnet) -> bool:
        return self.cost(subnet) <= self.budget

    def evaluate(self, subnet: Subnet) -> float:
        if subnet not in self.scores:
            self.scores[subnet] = float(self.score(subnet))
        return self.scores[subnet]

    def random(self) -> Subnet:
        """A feasible subnet drawn at random; after ``tries`` misses, the smallest (always feasible)."""
        sizes = self._sizes()
        for _ in range(self.tries):
            s = self.subnet(self.rng.integers(0, sizes))
            if self.feasible(s):
                return s
        return self.space.smallest()

    def mutate(self, subnet: Subnet, probability: float) -> Subnet:
        genes, sizes = self.genes(subnet), self._sizes()
        flip = self.rng.random(len(genes)) < probability
        genes[flip] = self.rng.integers(0, sizes[flip])
        return self.subnet(genes)

    def crossover(self, a: Subnet, b: Subnet) -> Subnet:
        ga, gb = self.genes(a), self.genes(b)
        return self.subnet(np.where(self.rng.random(len(ga)) < 0.5, ga, gb))

    def best(self) -> Subnet:
        """The best scored subnet within the budget (the cheaper of equals); the smallest when none is."""
        feasible = [s for s in self.scores if self.feasible(s)]
        if not feasible:
            return self.space.smallest()
        return max(feasible, key=lambda s: (self.scores[s], -self.cost(s)))


def _feasible_child(p: Problem, make: Callable[[], Subnet]) -> Subnet | None:
    for _ in range(p.tries):
        s = make()
        if p.feasible(s):
            return s
    return None


def evolution(p: Problem, population: int = 32, generations: int = 10, parents: float = 0.25,
              mutation: float = 0.1, mutate_share: float = 0.5) -> Subnet:
    """OFA's evolutionary search: a feasible random population (half of it, at most, the best subnets scored before
    that fit the budget: a search at another budget); each generation keeps the best ``parents`` share and fills the
    rest half by mutation (every gene redrawn with ``mutation`` probability) of a random parent and half by uniform
    crossover of two; children over the budget are drawn again."""
    known = sorted((s for s in p.scores if p.feasible(s)), key=p.scores.__getitem__, reverse=True)
    pop = known[:population // 2]
    pop += [p.random() for _ in range(population - len(pop))]
    for s in pop:
        p.evaluate(s)
    keep = max(1, int(round(parents * population)))
    for _ in range(generations):
        top = sorted(set(pop), key=p.evaluate, reverse=True)[:keep]
        children: list[Subnet] = []
        n_mutants = int(round(mutate_share * (population - len(top))))
        while len(top) + len(children) < population:
            if len(children) < n_mutants:
                make = (lambda: p.mutate(top[p.rng.integers(len(top))], mutation))
            else:
                make = (lambda: p.crossover(top[p.rng.integers(len(top))], top[p.rng.integers(len(top))]))
            child = _feasible_child(p, make)
            children.append(child if child is not None else p.random())
        for s in children:
            p.evaluate(s)
        pop = top + children
    return p.best()


def anneal(p: Problem, steps: int = 400, cool_down: float = 0.98, warmup: int = 8) -> Subnet:
    """SANAS's simulated annealing: from a feasible random subnet, a neighbour (one gene redrawn) replaces the current
    subnet when it scores higher, or with probability exp(delta / T); T starts at half the standard deviation of
    ``warmup`` random subnets' scores and decays by ``cool_down`` per step.  Infeasible neighbours are not scored."""
    seeds = [p.random() for _ in range(warmup)]
    values = [p.evaluate(s) for s in seeds]
    temperature = float(np.std(values)) / 2 or 1.0
    current = max(seeds, key=p.evaluate)
    n_genes = len(p.genes(current))
    for _ in range(steps):
        neighbour = p.mutate(current, 1.0 / max(n_genes, 1))
        if neighbour == current or not p.feasible(neighbour):
            continue
        delta = p.evaluate(neighbour) - p.evaluate(current)
        if delta >= 0 or p.rng.random() < math.exp(delta / max(temperature, 1e-12)):
            current = neighbour
        temperature *= cool_down
    return p.best()


class SubnetQuality:
    """Scores subnets of ``net``: BatchNorm statistics re-estimated on ``batches`` for each, then ``eval_fn(net)``
    or the SQNR (dB) of the outputs against the largest subnet's.  ``keep`` leaves a subnet active with its own
    statistics; until then the trained statistics are restored after every score."""

    def __init__(self, net: Supernet, batches: list[tuple], eval_fn=None):
        self.net, self.batches, self.eval_fn = net, batches, eval_fn
        self.norms = bn_stats.tracked_norms(net)
        self.saved = bn_stats.snapshot(self.norms)
        self.reference = None
        self.scored: dict[Subnet, float] = {}
        if eval_fn is None:
            self.reference = self._outputs(net.space.largest())
            self._restore()

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
        bn_stats.restore(self.norms, self.saved)

    def __call__(self, subnet: Subnet) -> float:
        if subnet in self.scored:
            return self.scored[subnet]
        try:
            if self.eval_fn is None:
                value = sqnr_db(self.reference, self._outputs(subnet))
            else:
                self._activate(subnet)
                with torch.no_grad():
                    value = float(self.eval_fn(self.net))
        finally:
            self._restore()
        self.scored[subnet] = value
        return value

    def keep(self, subnet: Subnet) -> None:
        self._activate(subnet)


STRATEGIES: dict[str, Callable[..., Subnet]] = {"evolution": evolution, "anneal": anneal}
