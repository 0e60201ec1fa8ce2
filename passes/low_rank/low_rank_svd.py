"""Replace Linear and Conv layers by two thinner ones from a truncated SVD of the weight.

    before:  y = fc(x)                          W: out x in
    after:   y = fc.1(fc.0(x))                  fc.0: in -> r (no bias),  fc.1: r -> out (bias)
             W ~ U_r S_r V_r^T,  fc.0.weight = S_r^1/2 V_r^T,  fc.1.weight = U_r S_r^1/2

    before:  y = conv(x)                        k x k conv, W reshaped to out x (in k k)
    after:   y = conv.1(conv.0(x))              conv.0: k x k, in -> r, same stride/padding/dilation;  conv.1: 1 x 1

The rank of each layer comes from one of (exactly one may be given; ``energy=0.95`` when none is):

- ``energy``: the smallest r keeping that fraction of the sum of squared singular values;
- ``rank_ratio``: r = ceil(rank_ratio x full rank);
- ``target`` (with ``target_metric`` "macs" or "params"): the model keeps that fraction of its MACs (params);
  ranks are allocated across layers by the smallest loss of energy per saved MAC (param), greedily along each
  layer's lower convex hull of (cost, energy lost), so that a layer is only switched on where it pays;
- ``ranks``: {module name: rank}, as given (a plan replayed, or plain and data-aware SVD compared at equal ranks).

A layer is replaced only when its rank saves MACs: r (in k k + out) < out (in k k).  With ``data_aware=True`` the
SVD is of W R, with R R^T = E[x x^T] + damping (Cholesky) over the layer's input (image patches for a conv) from the
calibration data, and the factors are S_r^1/2 V_r^T R^-1 and U_r S_r^1/2: since ||(W - W') R|| is the output error
on that data, the truncation minimises it instead of the weight error (whitening).  Energies, and so ``energy``,
are then of the layer's output: keeping 95% of it leaves 5% of noise energy per layer (about 13 dB), which
compounds over layers; data-aware ranks for the same ``energy`` are much smaller than plain ones.

Layers (``nn.Linear``, ``nn.Conv1d/2d/3d`` called as modules) keep their names as containers: ``fc`` becomes a
``Sequential`` whose two children the graph calls.  A module called at several places is replaced at all of them.
Requires: shape metadata.  Contract: CHANGES (a truncation): the stats give each layer's kept energy and
relative weight error, and the output SQNR on the example inputs.  The pass is a planner (``decide``: candidates,
SVDs, ranks, into a ``LowRankPlan`` in ``ctx.plans[LowRankPlan]``) and an applier (``apply``: the planned layers
become their factors); a plan given to ``compile(..., plans=...)`` is applied with its ranks (and its
``data_aware``) instead of choosing them again.
Skips (counted in stats, named in the notes): ``excluded``, ``grouped`` (groups > 1), ``tied_weight`` (the weight
is shared with another module), ``no_saving`` (the chosen rank would not save MACs), ``transposed``
(ConvTranspose), ``functional`` (F.linear / F.conv with graph tensors), ``attention`` (projections inside
``nn.MultiheadAttention``, which the graph does not call as Linear modules).
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import math
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from fxcompress.passes.quant.calibrate import calibration_batches
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from fxcompress import layer_inputs, meta, ops
from fxcompress.context import CompileContext
from fxcompress.counting import totals
from fxcompress.errors import InputError, RecipeError, VerificationError, did_you_mean
from fxcompress.instruments import sqnr_db
from fxcompress.options import as_patterns, check_patterns, matches
from fxcompress.pass_base import Contract, Pass, PassResult, refuse_quantized
from fxcompress.plans import Artifact, Lifetime, data_class, graph_signature, replayed

DAMPING = 1e-4  # added to E[x x^T]'s diagonal, relative to its mean: keeps R invertible (full rank stays exact)
SKIP_REASONS = ("excluded", "grouped", "tied_weight", "no_saving", "transposed", "functional", "attention")
_FUNCTIONAL = (F.linear, F.conv1d, F.conv2d, F.conv3d)


@data_class
@dataclasses.dataclass(frozen=True)
class LayerRank:
    """The decision for one layer: its rank and what it costs and keeps."""

    rank: int
    full_rank: int
    energy: float  # fraction of the squared singular values kept (of W, or of W R when data-aware)
    macs: tuple[int, int]  # (before, after), over every call of the module
    params: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class LowRankPlan(Artifact):
    """The rank of every factorized layer, and why the others were left whole."""

    kind = "low_rank_plan"
    owner = "low_rank_svd"
    lifetime = Lifetime.DECISION

    layers: dict[str, LayerRank]  # module name -> decision
    skipped: dict[str, str]  # module or node name -> reason
    data_aware: bool
    graph: str = ""  # graph_signature of the module it was made for

    def summary(self) -> str:
        macs = [sum(d.macs[i] for d in self.layers.values()) for i in (0, 1)]
        return (f"{len(self.layers)} layers factorized ({'data-aware' if self.data_aware else 'plain'}), "
                f"{len(self.skipped)} skipped; their MACs {macs[0]} -> {macs[1]}")


@dataclasses.dataclass
class _Candidate:
    name: str
    module: nn.Module
    nodes: list[torch.fx.Node]
    rows: int  # out
    cols: int  # in x prod(kernel)
    positions: int  # output positions over all calls (MACs = positions x rows x cols)
    whitening: tuple[torch.Tensor, torch.Tensor] | None = None  # (R, R^-1) when data-aware
    u: torch.Tensor | None = None
    s: torch.Tensor | None = None
    vh: torch.Tensor | None = None

    @property
    def full_rank(self) -> int:
        return min(self.rows, self.cols)

    def macs(self, rank: int | None) -> int:
        return self.positions * (self.rows * self.cols if rank is None else rank * (self.rows + self.cols))

    def params(self, rank: int | None) -> int:
        return self.rows * self.cols if rank is None else rank * (self.rows + self.cols)

    def kept(self) -> torch.Tensor:
        """Fraction of the squared singular values kept at each rank: kept()[r - 1] for rank r."""
        s2 = self.s.double() ** 2
        total = float(s2.sum())
        return torch.cumsum(s2, 0) / total if total > 0 else torch.ones_like(s2)

    def energy(self, rank: int) -> float:
        return float(self.kept()[rank - 1])


def matrix(module: nn.Module) -> torch.Tensor:
    """The weight as out x (in k k), in float64."""
    return module.weight.detach().double().reshape(module.weight.shape[0], -1)


def factorize(w: torch.Tensor, rank: int, whitening: tuple[torch.Tensor, torch.Tensor] | None = None,
              svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: rank x cols, B: rows x rank) with B @ A the best rank-``rank`` approximation of ``w`` (in the metric of
    the whitening, if given); the singular values are split evenly between the factors."""
    u, s, vh = svd if svd is not None else _svd(w, whitening)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    if whitening is not None:
        a = a @ whitening[1]
    return a, u[:, :rank] * root[None, :]


def _svd(w: torch.Tensor, whitening: tuple[torch.Tensor, torch.Tensor] | None):
    return torch.linalg.svd(w if whitening is None else w @ whitening[0], full_matrices=False)


def decompose(c: _Candidate) -> None:
    """The SVD of the candidate's weight matrix (whitened, if it has a whitening)."""
    c.u, c.s, c.vh = _svd(matrix(c.module), c.whitening)


class LowRankSVD(Pass):
    """Low-rank SVD replacement of Linear and Conv layers (plain or data-aware)."""

    name = "low_rank_svd"
    produces = (LowRankPlan,)
    contract = Contract.CHANGES

    def __init__(self, energy: float | None = None, rank_ratio: float | None = None, target: float | None = None,
                 target_metric: str = "macs", ranks: dict[str, int] | None = None, data_aware: bool = False,
                 max_samples: int = 512, exclude: str | list[str] | tuple[str, ...] = ()):
        given = [k for k, v in (("energy", energy), ("rank_ratio", rank_ratio), ("target", target), ("ranks", ranks))
                 if v is not None]
        if len(given) > 1:
            raise RecipeError(f"low_rank_svd: give one of energy, rank_ratio, target, ranks; got {', '.join(given)}.")
        if ranks is not None and (not isinstance(ranks, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
                for k, v in ranks.items())):
            raise RecipeError(f"low_rank_svd: ranks must map module names to positive integers, got {ranks!r}.")
        for key, value in (("energy", energy), ("rank_ratio", rank_ratio), ("target", target)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value <= 1):
                raise RecipeError(f"low_rank_svd: {key} must be a number in (0, 1], got {value!r}.")
        if target_metric not in ("macs", "params"):
            raise RecipeError(f"low_rank_svd: target_metric must be 'macs' or 'params', got {target_metric!r}.")
        if not isinstance(max_samples, int) or max_samples < 1:
            raise RecipeError(f"low_rank_svd: max_samples must be a positive integer, got {max_samples!r}.")
        self.energy = 0.95 if not given else energy
        self.rank_ratio, self.target, self.target_metric = rank_ratio, target, target_metric
        self.ranks = dict(ranks) if ranks is not None else None
        self.data_aware, self.max_samples = bool(data_aware), max_samples
        self.exclude = as_patterns(self.name, "exclude", exclude)

    def verify(self, ctx: CompileContext) -> None:
        """Every planned layer is now its two factors at the planned rank, and the graph calls only the factors."""
        plan: LowRankPlan = ctx.plans[LowRankPlan]
        called = {n.target for n in ctx.gm.graph.nodes if n.op == "call_module"}
        for name, decision in plan.layers.items():
            pair = ctx.gm.get_submodule(name)
            if not (isinstance(pair, nn.Sequential) and len(pair) == 2 and pair[0].weight.shape[0] == decision.rank
                    and pair[1].weight.shape[1] == decision.rank):
                raise VerificationError(f"[{self.name}] {name} is not factorized at rank {decision.rank}.")
            if name in called or f"{name}.0" not in called or f"{name}.1" not in called:
                raise VerificationError(f"[{self.name}] the graph does not call {name}'s factors in its place.")

    def run(self, ctx: CompileContext) -> PassResult:
        refuse_quantized(ctx.gm, self.name, "Factorize before quantizing: [{\"pass\": \"low_rank\", ...}, "
                                            "{\"pass\": \"quantize\"}].")
        check_patterns(self.name, "exclude", self.exclude, [n for n, _ in ctx.gm.named_modules() if n])
        plan, found, start, stats, notes = self.decide(ctx)
        ctx.plans[LowRankPlan] = plan
        if not plan.layers:
            return PassResult(False, stats, notes)
        stats, notes = self.apply(ctx, plan, {c.name: c for c in found}, start, stats, notes)
        return PassResult(True, stats, notes)

    def decide(self, ctx: CompileContext) -> tuple[LowRankPlan, list[_Candidate], Any, dict[str, Any], tuple]:
        """The planner: the candidates, their SVDs (whitened by the layers' inputs when data-aware) and a rank
        per layer, from the options or from the given plan; the module is not changed."""
        gm = ctx.gm
        given = replayed(ctx, LowRankPlan, self.name)
        signature = graph_signature(gm)
        data_aware = given.data_aware if given is not None else self.data_aware
        found, skipped = candidates(gm, self.exclude)
        plain = self._whiten(ctx, found) if data_aware and found else []
        for c in found:
            decompose(c)
        start = totals(gm)
        ranks = {n: d.rank for n, d in given.layers.items()} if given is not None else self._ranks(start, found)
        missing = sorted(set(ranks) - {c.name for c in found})
        if missing:
            raise InputError(f"[{self.name}] the given low_rank_plan factorizes {', '.join(missing[:5])}, which this "
                             f"pass cannot factorize here (excluded, or not a candidate); drop them from exclude.")
        seen = len(found) + len(skipped)
        layers: dict[str, LayerRank] = {}
        for c in found:
            rank = ranks.get(c.name)
            if rank is None or c.macs(rank) >= c.macs(None):
                needed = rank if rank is not None else c.full_rank
                skipped[c.name] = f"no_saving (rank {needed} of {c.full_rank} would not save MACs)"
                continue
            layers[c.name] = LayerRank(rank, c.full_rank, round(c.energy(rank), 6), (c.macs(None), c.macs(rank)),
                                       (c.params(None), c.params(rank)))
        plan = given if given is not None else LowRankPlan(layers, skipped, data_aware, signature)
        stats: dict[str, Any] = {"layers_seen": seen, "layers_replaced": len(layers)}
        if given is not None:
            stats["replayed"] = True
        stats |= {f"skipped_{r}": sum(1 for v in skipped.values() if v.split(" ")[0] == r) for r in SKIP_REASONS}
        notes = tuple(f"{name}: {reason.replace('_', ' ')}" for name, reason in skipped.items()) + tuple(plain)
        return plan, found, start, stats, notes

    def apply(self, ctx: CompileContext, plan: LowRankPlan, by_name: dict[str, _Candidate], start: Any,
              stats: dict[str, Any], notes: tuple) -> tuple[dict[str, Any], tuple]:
        """The applier: every planned layer becomes its two factors at the planned rank."""
        gm, layers = ctx.gm, plan.layers
        with meta.side_effect_free(gm):
            before = gm(*ctx.example_inputs)
        errors = [apply_layer(gm, by_name[name], decision.rank) for name, decision in layers.items()]
        gm.graph.lint()
        gm.recompile()
        meta.propagate(gm, ctx.example_inputs)
        with meta.side_effect_free(gm):
            after = gm(*ctx.example_inputs)
        stats = stats | {
            "macs_replaced": [sum(d.macs[0] for d in layers.values()), sum(d.macs[1] for d in layers.values())],
            "params_replaced": [sum(d.params[0] for d in layers.values()), sum(d.params[1] for d in layers.values())],
            "min_energy": min(d.energy for d in layers.values()),
            "max_weight_error": round(max(errors), 6),
            "output_sqnr_db": round(sqnr_db(before, after), 2),
        }
        notes += tuple(f"{name}: rank {d.rank}/{d.full_rank}, energy {d.energy:.4f}, MACs {d.macs[0]} -> {d.macs[1]}"
                       for name, d in layers.items())
        if self.target is not None:
            kept = self._share(start, totals(gm))
            stats["target_share"] = round(kept, 4)
            if kept > self.target + 1e-9:
                notes += (f"target {self.target} of the model's {self.target_metric} not reached: {kept:.3f} with every "
                          f"factorizable layer at its smallest rank (layers not factorized keep their cost)",)
        return stats, notes

    def _cost(self, total) -> int:
        return total.macs if self.target_metric == "macs" else total.params

    def _share(self, before, after) -> float:
        return self._cost(after) / self._cost(before) if self._cost(before) else 1.0

    def _ranks(self, total, layers: list[_Candidate]) -> dict[str, int]:
        if self.ranks is not None:
            names = {c.name: c for c in layers}
            for name, rank in self.ranks.items():
                if name not in names:
                    raise RecipeError(f"[low_rank_svd] ranks names {name!r}, which is not a layer that can be "
                                      f"factorized.{did_you_mean(name, list(names))} Layers: {', '.join(names)}.")
                if rank > names[name].full_rank:
                    raise RecipeError(f"[low_rank_svd] ranks[{name!r}] = {rank} exceeds the layer's full rank "
                                      f"{names[name].full_rank}.")
            return dict(self.ranks)
        if self.energy is not None:
            out = {}
            for c in layers:
                s2 = c.s.double() ** 2
                kept = torch.cumsum(s2, 0) / s2.sum().clamp(min=1e-300)  # an all-zero weight keeps its full rank
                out[c.name] = min(int(torch.searchsorted(kept, torch.tensor(self.energy - 1e-12,
                                                                             dtype=torch.float64))) + 1, c.full_rank)
            return out
        if self.rank_ratio is not None:
            return {c.name: max(1, math.ceil(self.rank_ratio * c.full_rank - 1e-9)) for c in layers}
        whole = self._cost(total)
        return allocate(layers, whole, self.target * whole, self.target_metric)

    def _whiten(self, ctx: CompileContext, layers: list[_Candidate]) -> list[str]:
        """E[x x^T] of every candidate's input (patches for convs), then R with R R^T = E + damping (Cholesky)
        and R^-1.
        3-d convs keep the plain SVD (returned as notes)."""
        if ctx.calibration_data is None:
            raise InputError("[low_rank_svd] data_aware=True needs calibration data: pass compile(..., "
                             "calibration_data=batches), inputs shaped like the example inputs.")
        plain = [c.name for c in layers if not layer_inputs.supported(c.module)]
        layers = [c for c in layers if c.name not in plain]
        moments = layer_inputs.input_moments(ctx.gm, [c.module for c in layers], calibration_batches(ctx),
                                             self.max_samples)
        for c, m in zip(layers, moments):
            cov = m.mean()
            cov += torch.eye(c.cols, dtype=cov.dtype) * (DAMPING * max(float(cov.diagonal().mean()), 1e-12))
            root = torch.linalg.cholesky(cov)  # root @ root.T = cov: ||(W - W') root|| is the output error
            c.whitening = (root, torch.linalg.solve_triangular(root, torch.eye(c.cols, dtype=cov.dtype), upper=False))
        return [f"{name}: plain SVD (data-aware whitening covers 1-d and 2-d convs)" for name in plain]


def candidates(gm: torch.fx.GraphModule, exclude: tuple[str, ...] = ()) -> tuple[list[_Candidate], dict[str, str]]:
    """The layers that can be factorized, and the others with the reason (module or node name -> reason)."""
    calls: dict[str, list[torch.fx.Node]] = collections.defaultdict(list)
    skipped: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if ops.of_module(m, "factorizes") is not None:
                calls[node.target].append(node)
            elif isinstance(m, nn.MultiheadAttention):
                skipped[node.target] = "attention (its projections are inside nn.MultiheadAttention)"
        elif node.op == "call_function" and node.target in _FUNCTIONAL:
            skipped[node.name] = f"functional ({node.target.__name__} on graph tensors)"
    owners = collections.Counter(id(p) for m in gm.modules() for p in m.parameters(recurse=False))
    found = []
    for name, nodes in calls.items():
        m = gm.get_submodule(name)
        reason = None
        if any(matches(name, e) for e in exclude):
            reason = "excluded"
        elif not ops.of_module(m, "factorizes"):
            reason = ("transposed (ConvTranspose is not factorized)" if isinstance(m, _ConvTransposeNd)
                      else f"{type(m).__name__} is not factorized")
        elif isinstance(m, _ConvNd) and m.groups > 1:
            reason = f"grouped (groups={m.groups})"
        elif owners[id(m.weight)] > 1:
            reason = "tied_weight (the weight is shared with another module)"
        if reason is not None:
            skipped[name] = reason
            continue
        positions = 0
        for node in nodes:
            out = meta.tensor_info(node)
            if out is None:
                positions = -1
                break
            positions += out.numel // m.weight.shape[0]
        if positions < 0:
            skipped[name] = "no_saving (no shape metadata: MACs unknown)"
            continue
        w = m.weight
        found.append(_Candidate(name, m, nodes, w.shape[0], w[0].numel(), positions))
    return found, skipped


def allocate(layers: list[_Candidate], whole: float, budget: float, metric: str) -> dict[str, int]:
    """Ranks that bring the model's cost (MACs or params) from ``whole`` to at most ``budget``, spending the
    smallest loss of energy per unit saved: every layer's moves are the segments of the lower convex hull of its
    (cost, energy lost) points, starting from "not replaced"; segments of all layers are taken by slope."""
    cost = (lambda c, r: c.macs(r)) if metric == "macs" else (lambda c, r: c.params(r))
    heap: list[tuple[float, int, str, int]] = []
    hulls = {}
    for c in layers:
        hulls[c.name] = _hull(c, cost)
        if hulls[c.name]:
            slope, rank, saving = hulls[c.name][0]
            heapq.heappush(heap, (slope, 0, c.name, rank))
    ranks: dict[str, int] = {}
    current = whole
    by_name = {c.name: c for c in layers}
    while heap and current > budget:
        _, step, name, rank = heapq.heappop(heap)
        c = by_name[name]
        previous = ranks.get(name)
        current -= cost(c, previous) - cost(c, rank)
        ranks[name] = rank
        if step + 1 < len(hulls[name]):
            slope, nxt, _ = hulls[name][step + 1]
            heapq.heappush(heap, (slope, step + 1, name, nxt))
    return ranks


def _hull(c: _Candidate, cost) -> list[tuple[float, int, float]]:
    """(slope: energy lost per unit of cost saved, rank, saving) along the lower convex hull from "not replaced"
    down to rank 1, over the ranks that save cost."""
    lost = 1.0 - c.kept()  # lost[r - 1]: rank r
    full = cost(c, None)
    ranks = [r for r in range(1, c.full_rank + 1) if cost(c, r) < full]
    if not ranks:
        return []
    costs = torch.tensor([float(cost(c, r)) for r in ranks], dtype=torch.float64)
    losses = lost[torch.tensor(ranks) - 1]
    losses = torch.where(losses < 1e-10, torch.zeros_like(losses), losses)  # float64 rounding of "nothing lost"
    out = []
    here_cost, here_loss, upper = float(full), 0.0, len(ranks)  # candidates: ranks[:upper]
    while upper > 0:
        saving = here_cost - costs[:upper]
        slope = (losses[:upper] - here_loss) / saving
        best = float(slope.min())
        ray = torch.nonzero(slope <= best + 1e-12 * abs(best))
        # the smallest rank that loses nothing (a free move goes all the way), else the largest on the steepest ray
        i = int(ray.min()) if best == 0 else int(ray.max())
        out.append((best, ranks[i], float(saving[i])))
        here_cost, here_loss, upper = float(costs[i]), float(losses[i]), i
    return out


def apply_layer(gm: torch.fx.GraphModule, c: _Candidate, rank: int) -> float:
    """Replace module ``c.name`` by a Sequential of its two factors and rewrite every call; returns the relative
    Frobenius error of the weight (B A against W)."""
    m = c.module
    w = matrix(m)
    a, b = factorize(w, rank, c.whitening, (c.u, c.s, c.vh))
    dtype, grad = m.weight.dtype, m.weight.requires_grad
    if isinstance(m, nn.Linear):
        first = nn.Linear(m.in_features, rank, bias=False)
        second = nn.Linear(rank, m.out_features, bias=m.bias is not None)
    else:
        conv = type(m)
        first = conv(m.in_channels, rank, m.kernel_size, m.stride, m.padding, m.dilation, 1, False, m.padding_mode)
        second = conv(rank, m.out_channels, 1, bias=m.bias is not None)
    first.weight = nn.Parameter(a.reshape(rank, *m.weight.shape[1:]).to(dtype), requires_grad=grad)
    second.weight = nn.Parameter(b.reshape(m.weight.shape[0], rank, *([1] * (m.weight.dim() - 2))).to(dtype),
                                 requires_grad=grad)
    if m.bias is not None:
        second.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    first.to(m.weight.device), second.to(m.weight.device)
    first.train(m.training), second.train(m.training)
    parent, _, leaf = c.name.rpartition(".")
    setattr(gm.get_submodule(parent), leaf, nn.Sequential(first, second))
    for node in c.nodes:
        with gm.graph.inserting_after(node):
            x = gm.graph.call_module(f"{c.name}.0", node.args, node.kwargs)
        with gm.graph.inserting_after(x):
            y = gm.graph.call_module(f"{c.name}.1", (x,))
        node.replace_all_uses_with(y)
        for new in (x, y):
            new.meta.update({k: v for k, v in node.meta.items() if k != meta.TENSOR})
        gm.graph.erase_node(node)
        for new, what in ((x, f"rank-{rank} factor of {c.name}"), (y, f"rank-{rank} output of {c.name}")):
            meta.add_provenance(new, LowRankSVD.name, what)
    approx = b.to(dtype).double() @ a.to(dtype).double()
    return float(torch.linalg.norm(approx - w) / torch.linalg.norm(w).clamp(min=1e-300))
