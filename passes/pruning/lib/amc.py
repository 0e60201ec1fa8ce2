"""AMC (He et al. 2018, "AutoML for Model Compression"): a DDPG agent chooses each group's share of channels kept,
one group after another, and is rewarded by the score of the finished plan.

- State of step t (min-max normalised over the groups): t, the group's width, its producing layer's input width,
  output height and width, stride and kernel, that layer's MACs, the cost already removed, the MACs still to come,
  the previous action.
- Action: the share kept, in [``lbound``, 1].  AMC's resource wall caps it so that the budget stays reachable with
  every later group at its smallest share; the last group takes whatever share meets the budget.
- Reward: the plan's score (``quality``, higher is better) for every step of the episode, minus a moving average
  of the rewards (AMC's baseline); discount 1, target networks updated softly.
- Episodes: the first quarter of ``evaluations`` act at random (warm-up), the rest follow the actor with truncated
  normal exploration noise of sigma 0.5 decaying by 0.95 per episode.  The best plan seen is returned.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
from fxcompress.passes.pruning.lib.width_search import Problem


def _mlp(n_in: int, hidden: int = 300, out_act: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                               nn.Linear(hidden, 1)]
    return nn.Sequential(*layers, *([out_act] if out_act is not None else []))


def states(p: Problem) -> np.ndarray:
    """The static part of every step's state (the dynamic features are filled in during an episode)."""
    space = p.space
    by_module = {}
    nodes = {n.name: n for n in space.cg.gm.graph.nodes}
    for name, shape in space.shapes.items():
        by_module[str(nodes[name].target)] = shape
    rows = []
    for t, grp in enumerate(space.groups):
        shape = next((by_module[m] for m in grp.modules if m in by_module), None)
        if shape is None:
            rows.append([t, grp.size, 0, 0, 0, 1, 1, 0])
            continue
        spatial = list(shape.spatial[-2:]) + [1] * (2 - len(shape.spatial[-2:]))
        stride = shape.stride[0] if shape.stride else 1
        kernel = shape.kernel[0] if shape.kernel else 1
        rows.append([t, grp.size, shape.cin, *spatial, stride, kernel, shape.macs])
    return np.array(rows, dtype=np.float64)


def _normalise(x: np.ndarray) -> np.ndarray:
    span = x.max(0) - x.min(0)
    return (x - x.min(0)) / np.where(span > 0, span, 1)


class _Agent:
    def __init__(self, n_state: int, seed: int, lr_actor: float = 1e-4, lr_critic: float = 1e-3, tau: float = 0.01):
        torch.manual_seed(seed)
        self.actor = _mlp(n_state, out_act=nn.Sigmoid())
        self.critic = _mlp(n_state + 1)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr_actor)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr_critic)
        self.tau = tau

    def act(self, state: np.ndarray) -> float:
        with torch.no_grad():
            return float(self.actor(torch.tensor(state, dtype=torch.float32)[None])[0, 0])

    def update(self, batch: list[tuple], discount: float = 1.0) -> None:
        s, a, r, s1, done = (torch.tensor(np.array(col), dtype=torch.float32) for col in zip(*batch))
        with torch.no_grad():
            q_next = self.critic_target(torch.cat([s1, self.actor_target(s1)], 1)).squeeze(1)
            y = r + discount * (1 - done) * q_next
        q = self.critic(torch.cat([s, a[:, None]], 1)).squeeze(1)
        loss = nn.functional.mse_loss(q, y)
        self.critic_opt.zero_grad()
        loss.backward()
        self.critic_opt.step()
        policy = -self.critic(torch.cat([s, self.actor(s)], 1)).mean()
        self.actor_opt.zero_grad()
        policy.backward()
        self.actor_opt.step()
        for net, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
            with torch.no_grad():
                for w, tw in zip(net.parameters(), target.parameters()):
                    tw.mul_(1 - self.tau).add_(self.tau * w)


def _truncated_normal(rng: np.random.Generator, mean: float, sigma: float, low: float, high: float) -> float:
    for _ in range(100):
        x = rng.normal(mean, sigma)
        if low <= x <= high:
            return float(x)
    return float(np.clip(mean, low, high))


def amc(p: Problem, lbound: float = 0.2, batch_size: int = 64, memory: int = 2000) -> list[int]:
    """The AMC search (see the module docstring)."""
    quality = p.need_quality("amc")
    rng = np.random.default_rng(p.seed)
    space = p.space
    n = len(space.groups)
    static = states(p)
    normalised = _normalise(static)
    macs = static[:, -1]
    total = max(float(macs.sum()), 1e-12)
    agent = _Agent(static.shape[1] + 3, p.seed)
    warmup = max(1, p.evaluations // 4)
    full_cost = p.cost(space.full())
    replay: list[tuple] = []
    baseline, sigma = None, 0.5
    best, best_value = None, -np.inf
    floor = [min(range(len(lv)), key=lambda j: abs(lv[j] - (1 - lbound) * g.size))
             for lv, g in zip(space.levels, space.groups)]
    for episode in range(p.evaluations):
        plan = [space.levels[g][floor[g]] for g in range(n)]  # later groups at their smallest share
        steps, previous = [], 0.0
        for t in range(n):
            current = list(plan[:t]) + [0] * (n - t)
            cost = p.cost(current)
            reduced = (full_cost - cost) / full_cost if np.isfinite(cost) else 1.0
            dynamic = [reduced, float(macs[t + 1:].sum()) / total, previous]
            state = np.concatenate([normalised[t], dynamic])
            if episode < warmup:
                action = float(rng.uniform(lbound, 1.0))
            else:
                action = _truncated_normal(rng, agent.act(state), sigma, lbound, 1.0)
            action = _wall(p, plan, t, action, lbound)
            plan[t] = p.nearest(1 - action)[t]
            steps.append((state, action))
            previous = action
        value = quality(plan) if p.feasible(plan) else -np.inf
        if value > best_value:
            best, best_value = list(plan), value
        reward = value if np.isfinite(value) else -1e3
        baseline = reward if baseline is None else baseline + 0.5 * (reward - baseline)
        for t, (state, action) in enumerate(steps):
            following = steps[t + 1][0] if t + 1 < n else state
            replay.append((state, action, reward - baseline, following, float(t + 1 == n)))
        replay = replay[-memory:]
        if episode >= warmup:
            sigma *= 0.95
            for _ in range(n):
                picks = rng.choice(len(replay), size=min(batch_size, len(replay)), replace=False)
                agent.update([replay[i] for i in picks])
        p.log(f"amc episode {episode + 1}: quality {value:.3f} (best {best_value:.3f})")
    p.info.update(episodes=p.evaluations, warmup=warmup, best_quality=round(float(best_value), 4))
    if best is None:
        p.info["fallback"] = "no episode's plan met the budget: the cheapest plan"
        return p.cheapest(p.nearest(1.0))
    return best


def _wall(p: Problem, plan: list[int], t: int, action: float, lbound: float) -> float:
    """AMC's resource wall: the largest share kept, up to ``action``, with which the budget is still met when every
    later group keeps its smallest share (``plan`` holds those for the later groups)."""
    for keep in np.linspace(action, lbound, 33):
        trial = list(plan)
        trial[t] = p.nearest(1 - keep)[t]
        if p.feasible(trial):
            return float(keep)
    return lbound
