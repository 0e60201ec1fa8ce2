"""Channel-dependency analysis: which channels must be removed together, as a graph of channel spaces
(the ``propagate_dependencies`` pass runs it and leaves it in ``ctx.analyses[ChannelGraph]``).

Every op's rule (``channel_rules.KINDS``, chosen by its record in ``fxcompress/ops.py``) relates dimensions
("spaces") of its inputs, outputs and parameters (``channel_rules.build_relations``).  The spaces and relations
form a networkx graph keyed by node names (``ChannelGraph.graph``; edge attribute ``map`` holds an ``Identity``,
``Offset`` or ``Factor``).  Elements linked by identity/offset relations are the
same *unit*; a space that is the product of others (a flatten into Linear, a channel shuffle, attention heads)
is *controlled* by its factors' units and removed when any of them is.  A *group* is the free units of one
connected set of spaces that reach a parameter: removing a unit of a group removes the matching slice of every
member parameter and activation.

Requires: shape metadata.  Contract: EXACT (adds an analysis, leaves the module alone).
Left whole (in stats, each with a reason in ``ChannelGroup.fixed``): groups reaching a model input or output,
an op the rules do not know (``barrier_ops``), a recurrent layer, a grouped structure the group cannot keep.
Marked inexact (``inexact_groups``): groups whose channels are normalised together (LayerNorm, GroupNorm,
softmax, a mean over channels), where removing differs from zeroing.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import math
from typing import Any

import networkx as nx
import torch
import torch.fx
from fxcompress.passes.pruning.lib.channel_rules import (
    Identity,
    Space,
    build_relations,
)

from fxcompress.context import CompileContext
from fxcompress.errors import RecipeError, did_you_mean
from fxcompress.fxutil import lookup
from fxcompress.plans import Artifact, Lifetime

ATTENTION_MODES = ("dims", "heads", "both")


@dataclasses.dataclass
class ChannelGroup:
    """Channels removed together.  ``units`` are global unit ids; the group's channel i is ``units[i]``."""

    id: int
    name: str  # the first module producing these channels (or the first member)
    units: torch.Tensor
    prunable: torch.Tensor  # bool per channel: False where some member is fixed
    blocks: torch.Tensor | None  # block id per channel when removals must be spread equally over blocks
    fixed: tuple[str, ...]  # why some or all channels are fixed
    inexact: tuple[str, ...]  # why removing differs from zeroing
    members: tuple[str, ...]  # "target[dim]" of every parameter/buffer slice that moves with the channels
    modules: tuple[str, ...]  # modules whose outputs are in the group
    spaces: tuple[Space, ...]
    positional: bool = False  # it indexes positions or heads (a bias table), not channels

    @property
    def size(self) -> int:
        return int(self.units.numel())

    @property
    def n_prunable(self) -> int:
        return int(self.prunable.sum())

    def __str__(self) -> str:
        state = "fixed" if not self.n_prunable else f"{self.n_prunable}/{self.size} prunable"
        extra = f"; inexact: {self.inexact[0]}" if self.inexact else ""
        return f"group {self.name}: {self.size} channels, {state}, {len(self.members)} members{extra}"


class ChannelGraph(Artifact):
    """Spaces, units and groups of one GraphModule (see the module docstring)."""

    kind = "channel_groups"
    owner = "propagate_dependencies"
    lifetime = Lifetime.ANALYSIS

    def __init__(self, gm: torch.fx.GraphModule, attention: str = "dims"):
        self.gm = gm
        self.rel = build_relations(gm)
        self.sizes = self.rel.sizes
        self._graph: nx.Graph | None = None
        self.same_factors: list[tuple[Space, Space, Identity]] = []
        self._assign_units()
        self.same_factors = self._same_factorizations()
        if self.same_factors:
            self._assign_units()
        self._controls()
        self._groups(attention)

    @property
    def graph(self) -> nx.Graph:
        """Spaces as nodes (attribute ``size``), relations as edges (attribute ``map``), built on first use."""
        if self._graph is None:
            g = nx.Graph()
            g.add_nodes_from((s, {"size": n}) for s, n in self.sizes.items())
            g.add_edges_from((a, b, {"map": m}) for a, b, m in self.rel.edges)
            g.add_edges_from((a, b, {"map": m}) for a, b, m in self.rel.factor_edges)
            g.add_edges_from((a, b, {"map": m}) for a, b, m in self.same_factors)
            self._graph = g
        return self._graph

    # -- units ------------------------------------------------------------------------------------------------
    def _assign_units(self) -> None:
        adj: dict[Space, list[tuple[Space, Any, bool]]] = collections.defaultdict(list)
        for a, b, m in [*self.rel.edges, *self.same_factors]:  # for Offset, a is the part
            adj[a].append((b, m, True))
            adj[b].append((a, m, False))
        units: dict[Space, torch.Tensor] = {}
        comp: dict[Space, int] = {}
        conflicts: list[tuple[torch.Tensor, torch.Tensor]] = []
        nxt = 0
        order = sorted(self.sizes, key=lambda s: -self.sizes[s])
        n_comp = 0
        for root in order:
            if root in units:
                continue
            units[root] = torch.arange(nxt, nxt + self.sizes[root])
            nxt += self.sizes[root]
            comp[root] = n_comp
            queue = collections.deque([root])
            while queue:
                s = queue.popleft()
                us = units[s]
                for t, m, s_is_part in adj[s]:
                    if isinstance(m, Identity):
                        cand, t_slice = us, slice(None)
                    elif not s_is_part:  # s is the whole, t the part
                        cand, t_slice = us[m.start:m.start + m.n], slice(None)
                    else:  # s is the part, t the whole
                        cand, t_slice = us, slice(m.start, m.start + m.n)
                    if t in units:
                        have = units[t]
                        if have is cand:
                            continue
                        have = have[t_slice]
                        if not torch.equal(have, cand):
                            conflicts.append((have, cand))
                        continue
                    if t_slice == slice(None):
                        units[t] = cand
                    else:
                        units[t], nxt = self._fill_whole(t, adj, units, nxt)
                    comp[t] = n_comp
                    queue.append(t)
            n_comp += 1
        self.n_units = nxt
        if conflicts:
            labels = _union(nxt, conflicts)
            keys = list(units)
            relabelled = torch.split(labels[torch.cat([units[k] for k in keys])], [units[k].numel() for k in keys])
            units = dict(zip(keys, relabelled))
        self.units = units
        self.component = comp
        self.n_components = n_comp

    def _same_factorizations(self) -> list[tuple[Space, Space, Identity]]:
        """Identity relations between the factors of two views that split the same units the same way (an attention
        vector reshaped to (radix, C) like the features it multiplies): the i-th slice of one view is the i-th of the
        other, so removing a factor's channel through one view alone would leave the other's shape uneven."""
        by_merged: dict[Space, list[tuple[int, int, Space]]] = collections.defaultdict(list)
        for merged, factor, f in self.rel.factor_edges:
            by_merged[merged].append((f.stride, f.size, factor))
        first: dict[tuple, list[Space]] = {}
        out: list[tuple[Space, Space, Identity]] = []
        for merged, factors in by_merged.items():
            factors.sort(key=lambda x: -x[0])
            if len(factors) < 2 or math.prod(f[1] for f in factors) != self.sizes[merged]:
                continue
            key = (tuple(self.units[merged].tolist()), tuple((st, n) for st, n, _ in factors))
            seen = first.setdefault(key, [f for _, _, f in factors])
            for a, (_, _, b) in zip(seen, factors):
                if a != b and not torch.equal(self.units[a], self.units[b]):
                    out.append((a, b, Identity()))
        return out

    def _fill_whole(self, t: Space, adj, units, nxt: int) -> tuple[torch.Tensor, int]:
        """Units of a whole space reached from one of its parts: visited parts first, fresh units for the rest."""
        fill = torch.full((self.sizes[t],), -1, dtype=torch.long)
        for p, m, t_is_part in adj[t]:
            if p in units and not t_is_part:
                if isinstance(m, Identity):
                    return units[p], nxt
                fill[m.start:m.start + m.n] = units[p]
        missing = fill < 0
        k = int(missing.sum())
        fill[missing] = torch.arange(nxt, nxt + k)
        return fill, nxt + k

    def _controls(self) -> None:
        """(controlled, controller) unit pairs from factor relations, flattened so every controller is free."""
        pairs_a, pairs_b = [], []
        for merged, factor, f in self.rel.factor_edges:
            e = torch.arange(self.sizes[merged])
            pairs_a.append(self.units[merged])
            pairs_b.append(self.units[factor][(e // f.stride) % f.size])
        self.controlled = torch.zeros(self.n_units, dtype=torch.bool)
        self.cycle_units = torch.zeros(self.n_units, dtype=torch.bool)
        self.regrouped_units = self._regrouped()
        if not pairs_a:
            self.ctrl = (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
            return
        a, b = torch.cat(pairs_a), torch.cat(pairs_b)
        self.controlled[a] = True
        for _ in range(16):  # nested products (a shuffle of a flatten): replace controlled controllers
            nested = self.controlled[b]
            if not bool(nested.any()):
                break
            order = torch.argsort(a)
            sa, sb = a[order], b[order]
            first = torch.searchsorted(sa, b[nested])
            last = torch.searchsorted(sa, b[nested], right=True)
            new_a, new_b = [a[~nested]], [b[~nested]]
            for x, lo, hi in zip(a[nested].tolist(), first.tolist(), last.tolist()):
                new_a.append(torch.full((hi - lo,), x, dtype=torch.long))
                new_b.append(sb[lo:hi])
            a, b = torch.cat(new_a), torch.cat(new_b)
        else:
            self.cycle_units[a[self.controlled[b]]] = True
            self.cycle_units[b[self.controlled[b]]] = True
        keep = a != b
        self.cycle_units[a[~keep]] = True
        pairs = torch.unique(torch.stack([a[keep], b[keep]]), dim=1)
        self.ctrl = (pairs[0], pairs[1])

    def _regrouped(self) -> torch.Tensor:
        """Units that two views split into factors differently (ShuffleNet's shuffled channels, which the next
        block's concat and shuffle regroup): removing them through either view's factors would leave the other view
        with uneven factors, so they are left whole (with their controllers).  Views that split the same units the
        same way agree."""
        structure: dict[Space, list] = collections.defaultdict(list)
        for merged, _, f in self.rel.factor_edges:
            structure[merged].append((f.stride, f.size))
        signature = {m: (tuple(sorted(s)), tuple(self.units[m].tolist())) for m, s in structure.items()}
        seen: dict[int, tuple] = {}
        out = torch.zeros(self.n_units, dtype=torch.bool)
        for m, sig in signature.items():
            for u in sig[1]:
                if seen.setdefault(u, sig) != sig:
                    out[u] = True
        return out

    def push_to_controllers(self, values: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Per-unit values with each controlled unit's value added (or or-ed) into its controllers."""
        a, b = self.ctrl
        out = values.clone()
        if reduce == "sum":
            out.index_add_(0, b, values[a])
        else:
            out[b[values[a]]] = True
        return out

    def closure(self, removed: torch.Tensor) -> torch.Tensor:
        """Removed free units → every removed unit (controlled units go with any of their controllers)."""
        a, b = self.ctrl
        out = removed.clone()
        out[a[removed[b]]] = True
        return out

    # -- groups ------------------------------------------------------------------------------------------------
    def _groups(self, attention: str) -> None:
        n = self.n_units
        has_member = self._units_of([*self.rel.params, *self.rel.grouped_inputs])
        has_member = self.push_to_controllers(has_member, "or")
        barred = self._units_of(self.rel.fixed_spaces) | self.cycle_units | self.regrouped_units
        inexact = self._units_of(self.rel.inexact_spaces)
        barred = self.push_to_controllers(barred, "or")
        inexact = self.push_to_controllers(inexact, "or")
        free = ~self.controlled & has_member

        spaces_of = collections.defaultdict(list)
        for s, c in self.component.items():
            spaces_of[c].append(s)
        reasons = collections.defaultdict(set)
        inexact_reasons = collections.defaultdict(set)
        for s, why in self.rel.fixed_spaces.items():
            reasons[self.component[s]].add(why)
        for s, c in (self.component.items() if bool(self.regrouped_units.any()) else ()):
            if bool(self.regrouped_units[self.units[s]].any()):
                reasons[c].add("channels that two views group differently (a channel shuffle whose halves are "
                               "concatenated and shuffled again)")
        for s, why in self.rel.inexact_spaces.items():
            inexact_reasons[self.component[s]].add(why)
        for merged, factor, _ in self.rel.factor_edges:  # reasons reach controllers through products
            cm, cf = self.component[merged], self.component[factor]
            reasons[cf] |= reasons[cm]
            inexact_reasons[cf] |= inexact_reasons[cm]

        self.group_of = torch.full((n,), -1, dtype=torch.long)
        self.local = torch.full((n,), -1, dtype=torch.long)
        self.groups: list[ChannelGroup] = []
        self.barred = barred
        # a group: the free units of one component with one source key, in order of component, key and unit
        key = self._source_keys()
        comp_of = torch.full((n,), -1, dtype=torch.long)
        distinct = {id(self.units[s]): (self.units[s], c) for s, c in self.component.items()}  # shared tensors once
        if distinct:
            tensors, comps = zip(*distinct.values())
            comp_of[torch.cat(tensors)] = torch.repeat_interleave(torch.tensor(comps),
                                                                  torch.tensor([t.numel() for t in tensors]))
        units = torch.nonzero(free & (comp_of >= 0)).flatten()
        order = torch.argsort((comp_of[units] * (int(key.max()) + 1 if n else 1) + key[units]) * n + units)
        units = units[order]
        pairs = torch.stack([comp_of[units], key[units]], 1)
        counts = torch.unique_consecutive(pairs, dim=0, return_counts=True)[1].tolist() if units.numel() else []
        for u in torch.split(units, counts):
            c = int(comp_of[u[0]])
            self._new_group(u, spaces_of[c], barred, inexact, reasons[c], inexact_reasons[c])
        self._space_groups: dict[int, set[int]] = {}
        self._members()
        self._constraints()
        self._factor_policy(attention)

    def _source_keys(self) -> torch.Tensor:
        """Per unit: the first parameter space producing it (directly or through a product).

        Units of one connected set of spaces that come from different producers (the inputs of a concat) are
        independent choices, so they form different groups; units produced together (a residual stream) share one.
        """
        params = list(self.rel.params.items())
        key = torch.full((self.n_units,), len(params) * 2 + 1, dtype=torch.long)
        if params:
            ranks = [i if p.role == "out" else len(params) + i for i, (_, p) in enumerate(params)]
            units = [self.units[s] for s, _ in params]
            flat = torch.cat(units)
            rank = torch.repeat_interleave(torch.tensor(ranks), torch.tensor([u.numel() for u in units]))
            key.scatter_reduce_(0, flat, rank, "amin")
        a, b = self.ctrl
        if a.numel():
            key.scatter_reduce_(0, b, key[a], "amin")
        return key

    def _new_group(self, u, spaces, barred, inexact, reasons, inexact_reasons) -> None:
        gid = len(self.groups)
        self.group_of[u] = gid
        self.local[u] = torch.arange(u.numel())
        self.groups.append(ChannelGroup(
            id=gid, name="", units=u, prunable=~barred[u], blocks=None,
            fixed=tuple(sorted(reasons)) if bool(barred[u].any()) else (),
            inexact=tuple(sorted(inexact_reasons)) if bool(inexact[u].any()) else (),
            members=(), modules=(), spaces=tuple(spaces), positional=any(sp in self.rel.positional for sp in spaces)))

    def _units_of(self, spaces) -> torch.Tensor:
        """A mask of the units of ``spaces``."""
        mask = torch.zeros(self.n_units, dtype=torch.bool)
        if spaces:
            mask[torch.cat([self.units[s] for s in spaces])] = True
        return mask

    def groups_of_space(self, s: Space) -> set[int]:
        u = self.units[s]
        known = self._space_groups.get(id(u))  # spaces related by identity share one units tensor
        if known is None:
            known = self._space_groups[id(u)] = self._groups_of_units(u)
        return set(known)

    def _groups_of_units(self, u: torch.Tensor) -> set[int]:
        direct = self.group_of[u]
        direct = direct[direct >= 0]
        if not direct.numel():
            out = set()
        elif int(direct.min()) == int(direct.max()):
            out = {int(direct[0])}
        else:
            out = set(direct.tolist())
        a, b = self.ctrl
        if a.numel() and bool(self.controlled[u].any()):
            mask = torch.isin(a, u)
            g = self.group_of[b[mask]]
            out |= set(g[g >= 0].tolist())
        return out

    def _members(self) -> None:
        members = collections.defaultdict(list)
        modules = collections.defaultdict(list)
        for s, p in self.rel.params.items():
            for gid in self.groups_of_space(s):
                members[gid].append(f"{p.target}[{p.dim}]")
                if p.role == "out" and p.module and p.module not in modules[gid]:
                    modules[gid].append(p.module)
        for s, g in self.rel.grouped_inputs.items():
            for gid in self.groups_of_space(s):
                members[gid].append(f"{g.module}.weight[in, groups={g.groups}]")
        seen: collections.Counter = collections.Counter()
        for grp in self.groups:
            grp.members = tuple(members[grp.id])
            grp.modules = tuple(modules[grp.id])
            name = grp.modules[0] if grp.modules else (grp.members[0].split("[")[0] if grp.members
                                                       else f"group{grp.id}")
            seen[name] += 1
            grp.name = name if seen[name] == 1 else f"{name}#{seen[name]}"

    def _fix(self, grp: ChannelGroup, why: str, units: torch.Tensor | None = None) -> None:
        mask = torch.ones_like(grp.prunable) if units is None else torch.isin(grp.units, units)
        if bool((grp.prunable & mask).any()):
            grp.prunable = grp.prunable & ~mask
            grp.fixed = grp.fixed + (why,)

    def _factor_policy(self, attention: str) -> None:
        """Where a space is the product of several prunable groups (heads × head dims), keep one of them."""
        by_merged = collections.defaultdict(list)
        for merged, factor, _ in self.rel.factor_edges:
            by_merged[merged].append(factor)
        for merged, factors in by_merged.items():
            gids = []
            for f in factors:
                for gid in sorted(self.groups_of_space(f)):
                    if self.groups[gid].n_prunable and gid not in gids:
                        gids.append(gid)
            if len(gids) < 2 or attention == "both":
                continue
            keep = gids[-1] if attention == "dims" else gids[0]
            for gid in gids:
                if gid != keep:
                    self._fix(self.groups[gid], f"{merged[0]} is a product of several groups; "
                                                f"attention={attention!r} prunes {self.groups[keep].name}")

    def _constraints(self) -> None:
        blocks: dict[int, torch.Tensor] = {}
        for s, c in self.rel.constraints.items():
            u = self.units[s]
            n = u.numel()
            gids = self.groups_of_space(s)
            if n % c.groups:
                for gid in gids:
                    self._fix(self.groups[gid], f"{s[0]}: {n} channels do not split into {c}")
                continue
            if bool(self.controlled[u].any()):
                self._controlled_constraint(s, c.groups, gids)
                continue
            if len(gids) != 1 or self.groups[next(iter(gids))].size != torch.unique(u).numel():
                for gid in gids:
                    self._fix(self.groups[gid], f"{s[0]}: its {c} blocks mix channels of several groups")
                continue
            gid = next(iter(gids))
            block = torch.arange(n) // (n // c.groups)
            cur = blocks.setdefault(gid, torch.zeros(self.groups[gid].size, dtype=torch.long))
            idx = self.local[u]
            cur[idx] = cur[idx] * c.groups + block
        for gid, b in blocks.items():
            grp = self.groups[gid]
            _, counts = torch.unique(b, return_counts=True)
            if bool((counts != counts[0]).any()):
                self._fix(grp, "grouped convolutions / GroupNorm split these channels into unequal blocks")
            grp.blocks = b

    def _controlled_constraint(self, s: Space, groups: int, gids: set[int]) -> None:
        """A grouped space made of products (a grouped conv after a channel shuffle): a controlling group is
        kept prunable only if each of its channels controls equally many positions in every block."""
        u = self.units[s]
        n = u.numel()
        if not bool(self.controlled[u].all()):
            for gid in gids:
                self._fix(self.groups[gid], f"{s[0]}: grouped structure mixes products and plain channels")
            return
        pos = torch.full((self.n_units,), -1, dtype=torch.long)
        pos[u] = torch.arange(n)
        a, b = self.ctrl
        hit = pos[a] >= 0
        block = pos[a[hit]] // (n // groups)
        ctrl = b[hit]
        for gid in gids:
            mine = self.group_of[ctrl] == gid
            grp = self.groups[gid]
            counts = torch.zeros(grp.size, groups, dtype=torch.long)
            counts.index_put_((self.local[ctrl[mine]], block[mine]), torch.ones_like(block[mine]), accumulate=True)
            if bool((counts != counts[:, :1]).any()):
                self._fix(grp, f"{s[0]}: removing these channels would empty whole blocks of grouped({groups})")

    # -- queries -------------------------------------------------------------------------------------------------
    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise RecipeError(f"no channel group named {name!r}.{did_you_mean(name, [g.name for g in self.groups])}")

    def removed_positions(self, removed_units: torch.Tensor) -> dict[Space, torch.Tensor]:
        """For every space losing elements: the sorted positions removed (``removed_units`` after closure)."""
        if not hasattr(self, "_flat"):
            keys = list(self.units)
            sizes = torch.tensor([self.units[k].numel() for k in keys], dtype=torch.long)
            self._flat = (keys, torch.cat([self.units[k] for k in keys]), torch.cumsum(sizes, 0) - sizes)
        keys, flat, starts = self._flat
        pos = torch.nonzero(removed_units[flat]).flatten()
        space = torch.searchsorted(starts, pos, right=True) - 1
        local = pos - starts[space]
        ids, counts = torch.unique_consecutive(space, return_counts=True)
        return {keys[i]: p for i, p in zip(ids.tolist(), torch.split(local, counts.tolist()))}

    def summary(self) -> str:
        return "\n".join(str(g) for g in self.groups)


def _union(n: int, conflicts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Labels after merging every pair of units in ``conflicts`` (vectorised union by minimum label)."""
    labels = torch.arange(n)
    if not conflicts:
        return labels
    a = torch.cat([c[0] for c in conflicts])
    b = torch.cat([c[1] for c in conflicts])
    while True:
        la, lb = labels[a], labels[b]
        if torch.equal(la, lb):
            return labels
        m = torch.minimum(la, lb)
        labels.scatter_reduce_(0, la, m, "amin")
        labels.scatter_reduce_(0, lb, m, "amin")
        while True:
            jumped = labels[labels]
            if torch.equal(jumped, labels):
                break
            labels = jumped


@contextlib.contextmanager
def _gc_paused():
    """Building the graph allocates many small objects; full collections over the model would only slow it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def channel_graph(ctx: CompileContext, attention: str = "dims") -> ChannelGraph:
    def build(c: CompileContext) -> ChannelGraph:
        with _gc_paused():
            return ChannelGraph(c.gm, attention)
    return ctx.analysis(ChannelGraph, build)


PRUNE_ORDER = 'Prune before quantizing: [{"pass": "prune", ...}, {"pass": "quantize"}].'


def channel_masks(cg: ChannelGraph, positions: dict[Space, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{tensor target: 0/1 mask} zeroing the removed ``positions`` (``cg.removed_positions``) in every member:
    what mask mode multiplies the tensors by (BatchNorm's running variance is left alone; a grouped conv's mask
    zeroes the weights reading removed inputs).  Nothing is written."""
    masks: dict[str, torch.Tensor] = {}
    for s, p in cg.rel.params.items():
        if s not in positions or p.target.endswith("running_var"):
            continue
        t = lookup(cg.gm, p.target)
        mask = masks.get(p.target, torch.ones_like(t, requires_grad=False))
        masks[p.target] = mask.index_fill(p.dim, positions[s], 0)
    for s, g in cg.rel.grouped_inputs.items():
        if s in positions:
            target = f"{g.module}.weight" if g.module else "weight"
            w = cg.gm.get_submodule(g.module).weight
            keep = grouped_input_mask(w.detach(), g.groups, positions[s])
            masks[target] = masks.get(target, torch.ones_like(w, requires_grad=False)) * keep
    return masks


def grouped_input_mask(w: torch.Tensor, groups: int, removed: torch.Tensor) -> torch.Tensor:
    """1/0 mask over a grouped conv weight zeroing the weights that read removed input channels."""
    cout, cin_g = w.shape[0], w.shape[1]
    mask = torch.ones(groups, cin_g, dtype=w.dtype)
    mask.view(-1)[removed] = 0
    return mask.repeat_interleave(cout // groups, 0).reshape(cout, cin_g, *([1] * (w.dim() - 2)))
