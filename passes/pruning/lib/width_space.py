"""What per-group channel counts do to a model: every layer's widths, the size of every other activation, the
parameters and MACs, without pruning anything.

A search over pruning ratios evaluates thousands of candidates; each is a vector ``removed`` (channels removed per
candidate group).  Within a group the channels go in the order ``select_channels`` removes them (lowest score
first, equally per block when the group has grouped structure), so a count fixes which units go; the channel
graph's closure then gives every space's remaining size, exactly as ``remove_channels`` will leave it (products
such as a flatten into a Linear lose every element one of their factors loses).

    space = WidthSpace(channel_graph, scores, layer_shapes(gm))
    widths = space.widths(removed)          # {layer node: (cin, cout)}
    space.volume(removed)                   # the other activations' size, as a fraction of the unpruned one
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.fx
from fxcompress.passes.pruning.lib.channel_deps import ChannelGraph, ChannelGroup
from fxcompress.passes.pruning.lib.latency import LayerShape

from fxcompress import meta
from fxcompress.errors import InputError
from fxcompress.fxutil import lookup
from fxcompress.options import matches
from fxcompress.plans import Artifact, Lifetime


@dataclasses.dataclass(frozen=True)
class PruningTargets(Artifact):
    """How many channels each group loses, as a ratio search chose them (group name -> count); ``select_channels``
    picks which, by its criterion, lowest scores first."""

    kind = "pruning_targets"
    owner = "search_widths"
    lifetime = Lifetime.DECISION

    removed: dict[str, int]
    sizes: dict[str, int]  # group name -> channels before
    graph: str = ""  # graph_signature of the module it was made for

    def summary(self) -> str:
        return (f"remove {sum(self.removed.values())} of {sum(self.sizes.values())} channels in "
                f"{sum(1 for k in self.removed.values() if k)} groups")

    def __str__(self) -> str:
        return "\n".join([f"PruningTargets: {self.summary()}"] +
                         [f"  {g}: remove {k}/{self.sizes[g]}" for g, k in self.removed.items() if k])


@dataclasses.dataclass(frozen=True)
class PruningPlan(Artifact):
    """Which channels of which group to remove, as data: group name → sorted channel indices."""

    kind = "pruning_plan"
    owner = "select_channels"
    lifetime = Lifetime.DECISION

    criterion: str
    removed: dict[str, tuple[int, ...]]
    sizes: dict[str, int]  # group name → channels before
    graph: str = ""  # graph_signature of the module it was made for

    def summary(self) -> str:
        return (f"{self.criterion}: remove {sum(map(len, self.removed.values()))} of {sum(self.sizes.values())} "
                f"channels in {sum(1 for r in self.removed.values() if r)} groups")

    def ratio(self, group: str) -> float:
        return len(self.removed.get(group, ())) / self.sizes[group]

    def __str__(self) -> str:
        lines = [f"PruningPlan({self.criterion}): {sum(map(len, self.removed.values()))} of "
                 f"{sum(self.sizes.values())} channels"]
        lines += [f"  {g}: remove {len(r)}/{self.sizes[g]}" for g, r in self.removed.items() if r]
        return "\n".join(lines)


def candidate_groups(cg: ChannelGraph, exclude: tuple[str, ...] = ()) -> list[ChannelGroup]:
    """The groups a width search may resize: prunable, of two channels or more, no producing module excluded."""
    return [g for g in cg.groups if g.n_prunable and g.size >= 2
            and not any(matches(m, p) for m in g.modules for p in exclude)]


def levels(grp: ChannelGroup, round_to: int = 1, min_channels: int = 1) -> list[int]:
    """The channel counts a group may lose, ascending from 0: multiples of its block count (grouped structure)
    that keep at least ``min_channels`` and, with ``round_to``, a kept width that is a multiple of it."""
    n, nb = grp.size, (int(grp.blocks.max()) + 1 if grp.blocks is not None else 1)
    if grp.blocks is not None:
        per_block = min(int((grp.prunable & (grp.blocks == b)).sum()) for b in range(nb))
        most = min(per_block, n // nb - 1) * nb
    else:
        most = grp.n_prunable
    most = min(most, n - max(1, min_channels))
    out = []
    for k in range(0, most + 1, nb):
        kept = n - k
        if k and round_to > 1 and kept % round_to:
            continue
        out.append(k)
    return out


class WidthSpace:
    """The candidate groups of a channel graph, their removal order, and the spaces that set layer widths,
    activation sizes and parameter sizes (see the module docstring)."""

    def __init__(self, cg: ChannelGraph, scores: torch.Tensor, shapes: dict[str, LayerShape],
                 groups: list[ChannelGroup], round_to: int = 1, min_channels: int = 1):
        self.cg, self.shapes, self.groups, self.round_to = cg, shapes, groups, round_to
        self.levels = [levels(g, round_to, min_channels) for g in groups]
        n = cg.n_units
        self.unit_group = torch.full((n,), len(groups), dtype=torch.long)  # len(groups): no candidate group
        self.unit_rank = torch.full((n,), n + 1, dtype=torch.long)
        for i, grp in enumerate(groups):
            s = torch.where(grp.prunable, scores[grp.units].float(), torch.full((grp.size,), math.inf))
            rank = torch.empty(grp.size, dtype=torch.long)
            if grp.blocks is None:
                rank[torch.argsort(s, stable=True)] = torch.arange(grp.size)
            else:  # the m-th lowest of every block goes with the m-th of the others: rank < m * nb
                nb = int(grp.blocks.max()) + 1
                for b in range(nb):
                    idx = torch.nonzero(grp.blocks == b).flatten()
                    rank[idx[torch.argsort(s[idx], stable=True)]] = torch.arange(idx.numel()) * nb + b
            rank[~grp.prunable] = n + 1
            self.unit_group[grp.units] = i
            self.unit_rank[grp.units] = rank
        self._spaces: dict[tuple[str, int], int] = {}
        self._space_units: list[torch.Tensor] = []
        nodes = {node.name: node for node in cg.gm.graph.nodes}
        self.layer_spaces: dict[str, tuple[int | None, int | None]] = {}
        for name, shape in shapes.items():
            node = nodes[name]
            dim = 1 if shape.kind == "conv" else len(shape.spatial) + 1
            x = node.args[0]
            in_dim = 1 if shape.kind == "conv" else len(meta.tensor_info(x).shape) - 1
            self.layer_spaces[name] = (self._space((x.name, in_dim)), self._space((name, dim)))
        self._volume_terms = []  # (elements, [space index per pruned dim]) of every other activation
        for node in cg.gm.graph.nodes:
            info = meta.tensor_info(node) if node.op in ("call_module", "call_function", "call_method") else None
            if info is None or node.name in shapes or not info.shape:
                continue
            dims = [self._space((node.name, d)) for d in range(len(info.shape))]
            self._volume_terms.append((math.prod(info.shape), [d for d in dims if d is not None]))
        self._param_terms = []  # (elements, [space index per pruned dim]) of every parameter
        for target, dims in self._param_dims(cg).items():
            numel = lookup(cg.gm, target).numel()
            self._param_terms.append((numel, [self._space(s) for s in dims]))
        self._flat = torch.cat(self._space_units) if self._space_units else torch.zeros(0, dtype=torch.long)
        self._segment = torch.repeat_interleave(torch.arange(len(self._space_units)),
                                                torch.tensor([u.numel() for u in self._space_units], dtype=torch.long))
        self._sizes = torch.tensor([u.numel() for u in self._space_units], dtype=torch.float64)
        # spaces a plan could empty (every unit removable): select_channels gives such a space a channel back, so
        # plans that empty one are not in the space (``empties``)
        every = torch.tensor([*(lv[-1] for lv in self.levels), 0], dtype=torch.long)
        removable = cg.closure(self.unit_rank < every[self.unit_group])
        fragile = {id(u): u for u in cg.units.values() if u.numel() and bool(removable[u].all())}
        units = list(fragile.values())
        self._fragile = torch.cat(units) if units else torch.zeros(0, dtype=torch.long)
        self._fragile_segment = torch.repeat_interleave(torch.arange(len(units)),
                                                        torch.tensor([u.numel() for u in units], dtype=torch.long))
        self._fragile_sizes = torch.tensor([u.numel() for u in units], dtype=torch.long)
        self._last: tuple[tuple[int, ...], torch.Tensor, bool] | None = None
        self._volume, self._params = self._packed(self._volume_terms), self._packed(self._param_terms)
        self._per_group = self._separable(units)

    def _packed(self, terms: list[tuple[int, list[int | None]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(elements, space index matrix padded with a space whose fraction is 1) of ``terms``, for one product."""
        pad = len(self._space_units)  # kept fractions get a 1 appended at this index
        width = max((len(d) for _, d in terms), default=0)
        index = torch.full((len(terms), max(width, 1)), pad, dtype=torch.long)
        for i, (_, dims) in enumerate(terms):
            dims = [d for d in dims if d is not None]
            index[i, :len(dims)] = torch.tensor(dims, dtype=torch.long)
        return torch.tensor([n for n, _ in terms], dtype=torch.float64), index

    @staticmethod
    def _param_dims(cg: ChannelGraph) -> dict[str, list[tuple[str, int]]]:
        out: dict[str, list[tuple[str, int]]] = {target: [] for target, _ in cg.gm.named_parameters()}
        for s, p in cg.rel.params.items():
            if p.target in out:  # buffers are members too, but not parameters
                out[p.target].append(s)
        for s, g in cg.rel.grouped_inputs.items():  # a grouped conv's weight holds cin / groups inputs per filter
            out[f"{g.module}.weight"].append(s)
        return out

    def _space(self, key: tuple[str, int]) -> int | None:
        if key not in self.cg.units:
            return None
        if key not in self._spaces:
            self._spaces[key] = len(self._space_units)
            self._space_units.append(self.cg.units[key])
        return self._spaces[key]

    # -- evaluation --------------------------------------------------------------------------------------------
    def check(self, removed: list[int] | tuple[int, ...]) -> None:
        if len(removed) != len(self.groups):
            raise InputError(f"a width plan has one count per candidate group ({len(self.groups)}), got "
                             f"{len(removed)}.")
        for k, grp, lv in zip(removed, self.groups, self.levels):
            if k not in lv:
                raise InputError(f"group {grp.name}: {k} removed channels is not one of its levels "
                                 f"({lv[:4]}...{lv[-1:]}).")

    def nearest(self, share: float | np.ndarray) -> list[int]:
        """Each group's level nearest to ``share`` of its channels removed (one share or one per group)."""
        shares = np.broadcast_to(np.asarray(share, float), (len(self.groups),))
        return [min(lv, key=lambda k: abs(k - s * g.size)) for lv, g, s in zip(self.levels, self.groups, shares)]

    def removed_units(self, removed: list[int] | tuple[int, ...]) -> torch.Tensor:
        """The units ``removed`` removes, closed over products (as ``select_channels`` picks them)."""
        counts = torch.tensor([*removed, 0], dtype=torch.long)
        return self.cg.closure(self.unit_rank < counts[self.unit_group])

    def removed_slices(self, removed: list[int] | tuple[int, ...]) -> list[tuple[str, int, torch.Tensor]]:
        """(parameter or buffer target, dim, indices) of every member slice ``removed`` removes."""
        members = self.cg.rel.params
        return [(members[s].target, members[s].dim, idx)
                for s, idx in self.cg.removed_positions(self.removed_units(removed)).items() if s in members]

    def _separable(self, fragile: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """Per candidate group, (rows, lost): the spaces and fragile unit sets (``rows``, spaces first) holding units
        the group removes, and ``lost[k, r]``, how many units of row ``rows[r]`` go when the group loses ``k``
        channels.  A unit goes with its own group's rank or with any of its controllers' (``cg.closure``); when
        every unit goes with at most one group, what a plan removes from a row is the sum of what each group
        removes, and ``_evaluate`` adds these counts instead of closing the plan over the whole graph (ResNet-50:
        2.3 ms a plan).  None when some unit goes with two groups."""
        n, none = self.cg.n_units, len(self.groups)
        group, rank = self.unit_group.clone(), self.unit_rank.clone()
        a, b = self.cg.ctrl
        by_controller = self.unit_group[b] < none
        a, b = a[by_controller], b[by_controller]
        if a.numel():
            first = torch.full((n,), none, dtype=torch.long).scatter_reduce(0, a, self.unit_group[b], "amin")
            last = torch.full((n,), -1, dtype=torch.long).scatter_reduce(0, a, self.unit_group[b], "amax")
            hit = first < none
            own = group < none
            if bool((hit & (first != last)).any()) or bool((hit & own & (group != first)).any()):
                return None
            group = torch.where(hit, first, group)
            rank = rank.scatter_reduce(0, a, self.unit_rank[b], "amin")
        rows = [*self._space_units, *fragile]
        flat = torch.cat(rows).numpy() if rows else np.zeros(0, dtype=np.int64)
        row_of = np.repeat(np.arange(len(rows)), [u.numel() for u in rows])
        group, rank = group.numpy()[flat], rank.numpy()[flat]
        out = []
        for g, grp in enumerate(self.groups):
            mine = (group == g) & (rank < grp.size)
            where, local = np.unique(row_of[mine], return_inverse=True)
            counts = np.zeros((grp.size + 1, len(where)))
            np.add.at(counts, (rank[mine] + 1, local), 1.0)
            out.append((where, np.cumsum(counts, 0)))
        return out

    def _evaluate(self, removed: list[int] | tuple[int, ...]) -> tuple[torch.Tensor, bool]:
        key = tuple(int(k) for k in removed)
        if self._last is not None and self._last[0] == key:
            return self._last[1], self._last[2]
        if self._per_group is not None:
            lost = np.zeros(len(self._space_units) + len(self._fragile_sizes))
            for k, (rows, counts) in zip(key, self._per_group):
                if k:
                    lost[rows] += counts[min(k, len(counts) - 1)]
            spaces = len(self._space_units)
            kept = self._sizes - torch.from_numpy(lost[:spaces])
            self._last = (key, kept, bool((lost[spaces:] == self._fragile_sizes.numpy()).any()))
            return self._last[1], self._last[2]
        closed = self.removed_units(key)
        lost = torch.zeros(len(self._space_units), dtype=torch.float64)
        lost.index_add_(0, self._segment, closed[self._flat].double())
        gone = torch.zeros(len(self._fragile_sizes), dtype=torch.long)
        gone.index_add_(0, self._fragile_segment, closed[self._fragile].long())
        self._last = (key, self._sizes - lost, bool((gone == self._fragile_sizes).any()))
        return self._last[1], self._last[2]

    def kept(self, removed: list[int] | tuple[int, ...]) -> torch.Tensor:
        """Remaining size of every tracked space (float64) when each candidate group loses ``removed[i]``."""
        return self._evaluate(removed)[0]

    def empties(self, removed: list[int] | tuple[int, ...]) -> bool:
        """Whether ``removed`` would empty some space (a piece of a split, a slice): such plans are not valid
        (``select_channels`` would give the space a channel back), and costs are infinite for them."""
        return self._evaluate(removed)[1]

    def widths(self, removed: list[int] | tuple[int, ...], kept: torch.Tensor | None = None
               ) -> dict[str, tuple[int, int]]:
        """{layer node: (cin, cout)} under ``removed``."""
        sizes = (self.kept(removed) if kept is None else kept).tolist()  # list indexing: a tensor's costs 1 us
        out = {}
        for name, (i, o) in self.layer_spaces.items():
            shape = self.shapes[name]
            out[name] = (int(sizes[i]) if i is not None else shape.cin, int(sizes[o]) if o is not None else shape.cout)
        return out

    def _fraction(self, packed: tuple[torch.Tensor, torch.Tensor], kept: torch.Tensor) -> float:
        elements, index = packed
        frac = torch.cat([kept / self._sizes.clamp_min(1), torch.ones(1, dtype=torch.float64)])
        return float((elements * frac[index].prod(1)).sum() / elements.sum().clamp_min(1))

    def volume(self, removed: list[int] | tuple[int, ...], kept: torch.Tensor | None = None) -> float:
        """The elements of every activation that is not a layer's output, as a fraction of the unpruned ones."""
        return self._fraction(self._volume, self.kept(removed) if kept is None else kept)

    def params(self, removed: list[int] | tuple[int, ...], kept: torch.Tensor | None = None) -> float:
        """The model's parameters left, as a fraction (infinite for a plan that ``empties`` a space)."""
        if self.empties(removed):
            return math.inf
        return self._fraction(self._params, self.kept(removed) if kept is None else kept)

    def macs(self, removed: list[int] | tuple[int, ...], widths: dict[str, tuple[int, int]] | None = None) -> float:
        """The layers' multiply-accumulates left, as a fraction (infinite for a plan that ``empties`` a space)."""
        if self.empties(removed):
            return math.inf
        widths = self.widths(removed) if widths is None else widths
        full = sum(s.macs for s in self.shapes.values())
        return sum(s.at(*widths[n]).macs for n, s in self.shapes.items()) / max(full, 1)

    def full(self) -> list[int]:
        """The unpruned plan."""
        return [0] * len(self.groups)
