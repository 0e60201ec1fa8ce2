"""An elastic supernet made from a traced model: every prunable channel group at a few widths, every residual
block whose branch can be dropped on or off, switched per step without copying a weight.

    space = ElasticSpace(width_space, widths=(0.25, 0.5, 0.75, 1.0), align=4, depth=True)
    net = Supernet(gm, space)                   # net(*inputs) runs the active subnet
    net.activate(space.smallest())              # or space.largest(), space.sample(rng), any Subnet
    small = extract(gm, space, subnet, inputs)  # a real smaller GraphModule: channels and blocks removed

Width: a group's channels go in the order ``WidthSpace`` ranks them (lowest score first), so every width keeps the
most important channels and a narrower subnet's channels are a subset of a wider one's (OFA's sorted channels
without moving any).  A subnet's removed channels are masked in every member of their group (``channel_masks``, the
masks of mask-mode pruning): the masked tensors are computed in the forward (``torch.func.functional_call``), so
gradients reach only the active channels and the weights themselves are never zeroed.  The choices of a group are
the removal levels (multiples of ``align`` kept, grouped structure respected) nearest each fraction of ``widths``.

Depth: a residual ``add(x, f(x))`` whose branch ``f`` reads nothing but ``x`` (and constants), whose nodes have no
user outside the branch, and whose output has x's shape can be skipped: the supernet's copy of the graph multiplies
``f(x)`` by a 0/1 gate, extraction replaces the add by ``x`` and drops the branch.  A block nested in another's
branch is a block of its own.

Extraction prunes a copy of ``gm`` with ``remove_channels`` applying the subnet's ``PruningPlan``, then removes
the skipped blocks; for groups without channel-mixing normalisation the result computes what the supernet computes
with that subnet active (the supernet is exact where mask mode is).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx
import torch.nn as nn
from fxcompress.passes.pruning.lib.channel_deps import channel_masks
from fxcompress.passes.pruning.lib.width_space import PruningPlan, WidthSpace, levels

from fxcompress import meta, pass_manager
from fxcompress.errors import RecipeError
from fxcompress.fxutil import lookup
from fxcompress.plans import data_class, graph_signature

ADDS = (operator.add, torch.add, "add")


@data_class
@dataclasses.dataclass(frozen=True)
class Block:
    """A residual block that can be skipped: ``add`` (node name) = shortcut + branch output."""

    add: str
    shortcut: str
    output: str  # the branch's last node (what the gate multiplies)
    branch: tuple[str, ...]  # every node of the branch, in graph order
    modules: tuple[str, ...]  # the modules the branch calls (for reports)

    def __str__(self) -> str:
        where = f"{self.modules[0]}..{self.modules[-1]}" if self.modules else self.output
        return f"{self.add} ({where}, {len(self.branch)} nodes)"


@data_class
@dataclasses.dataclass(frozen=True)
class Subnet:
    """One architecture of the supernet: channels removed per candidate group (``ElasticSpace.groups`` order) and
    the skipped blocks (their add nodes' names)."""

    removed: tuple[int, ...]
    skipped: tuple[str, ...] = ()


def skippable_blocks(gm: torch.fx.GraphModule) -> list[Block]:
    """Every ``add(x, f(x))`` whose branch can be dropped (see the module docstring), in graph order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    blocks = []
    for node in gm.graph.nodes:
        if not _is_add(node):
            continue
        a, b = node.args[:2]
        for x, y in ((a, b), (b, a)):
            block = _block(node, x, y, order)
            if block is not None:
                blocks.append(block)
                break
    return blocks


def _is_add(node: torch.fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or node.target not in ADDS or len(node.args) != 2:
        return False
    return not node.kwargs and all(isinstance(a, torch.fx.Node) for a in node.args)


def _block(add: torch.fx.Node, x: torch.fx.Node, y: torch.fx.Node, order: dict[torch.fx.Node, int]) -> Block | None:
    """The block ``add = x + y`` when y is a droppable branch over x, else None."""
    if y is x or y.op in ("placeholder", "get_attr") or order[y] < order[x]:
        return None
    shapes = [getattr(meta.tensor_info(n), "shape", None) for n in (x, y, add)]
    if shapes[0] is None or not shapes[0] == shapes[1] == shapes[2]:
        return None
    branch: set[torch.fx.Node] = set()
    stack = [y]
    while stack:  # everything y depends on after x, back to x; any other input disqualifies
        n = stack.pop()
        if n in branch:
            continue
        if n.op == "placeholder" or (order[n] < order[x] and n.op != "get_attr"):
            return None
        branch.add(n)
        for i in n.all_input_nodes:
            if i is not x and i.op != "get_attr":
                stack.append(i)
            elif i is x and meta.writes_in_place(n):
                return None  # the branch would change x itself
    for n in branch:  # (constants, get_attr, are read, never part of the branch)
        if any(u not in branch and u is not add for u in n.users) or (n is not y and add in n.users):
            return None
    nodes = sorted(branch, key=order.__getitem__)
    if not any(n.op in ("call_module", "call_function", "call_method") for n in nodes):
        return None
    modules = tuple(dict.fromkeys(n.target for n in nodes if n.op == "call_module"))
    return Block(add.name, x.name, y.name, tuple(n.name for n in nodes), modules)


class ElasticSpace:
    """The widths of every candidate group of ``space`` and the skippable blocks (see the module docstring)."""

    def __init__(self, space: WidthSpace, widths: Iterable[float] = (0.25, 0.5, 0.75, 1.0), align: int = 1,
                 depth: bool = True, blocks: list[Block] | None = None):
        self.space, self.cg = space, space.cg
        fractions = sorted({float(w) for w in widths}, reverse=True)
        self.choices: list[list[int]] = []  # per group: channels removed, ascending (0 = full width first)
        for grp, lv in zip(space.groups, space.levels):
            aligned = [k for k in levels(grp, align) if k in lv] or lv
            picks = {min(aligned, key=lambda k: abs((grp.size - k) - f * grp.size)) for f in fractions}
            self.choices.append(sorted(picks | {0}))
        self.groups = space.groups
        self.blocks = (skippable_blocks(self.cg.gm) if blocks is None else blocks) if depth else []
        self.elastic = [i for i, c in enumerate(self.choices) if len(c) > 1]

    # -- subnets ----------------------------------------------------------------------------------------------
    def largest(self) -> Subnet:
        return Subnet(tuple(0 for _ in self.groups))

    def smallest(self) -> Subnet:
        return Subnet(self.valid([c[-1] for c in self.choices]), tuple(b.add for b in self.blocks))

    def sample(self, rng: np.random.Generator) -> Subnet:
        removed = [int(c[rng.integers(len(c))]) for c in self.choices]
        skipped = tuple(b.add for b in self.blocks if rng.random() < 0.5)
        return Subnet(self.valid(removed), skipped)

    def valid(self, removed: list[int]) -> tuple[int, ...]:
        """``removed``, with groups widened one choice at a time (last group first) while it would empty some
        space (a piece of a split, a flatten's factor: ``WidthSpace.empties``)."""
        removed = list(removed)
        while self.space.empties(removed):
            i = max(i for i, k in enumerate(removed) if k)
            removed[i] = self.choices[i][self.choices[i].index(removed[i]) - 1]
        return tuple(removed)

    def check(self, subnet: Subnet) -> None:
        if len(subnet.removed) != len(self.groups):
            raise RecipeError(f"a subnet has one width per elastic group ({len(self.groups)}), got "
                              f"{len(subnet.removed)}.")
        for k, grp, c in zip(subnet.removed, self.groups, self.choices):
            if k not in c:
                raise RecipeError(f"group {grp.name}: {k} removed channels is not one of its widths "
                                  f"{[grp.size - j for j in c]}.")
        if self.space.empties(subnet.removed):
            raise RecipeError("a subnet's widths would empty a split piece or a flattened factor; widen a group.")
        unknown = set(subnet.skipped) - {b.add for b in self.blocks}
        if unknown:
            raise RecipeError(f"a subnet skips {sorted(unknown)[0]!r}, which is no skippable block.")

    def masks(self, subnet: Subnet) -> dict[str, torch.Tensor]:
        """{tensor target: 0/1 mask} of the channels ``subnet`` removes."""
        if not any(subnet.removed):
            return {}
        return channel_masks(self.cg, self.cg.removed_positions(self.space.removed_units(subnet.removed)))

    def plan(self, subnet: Subnet) -> PruningPlan:
        """The subnet's widths as the ``PruningPlan`` that ``remove_channels`` applies."""
        removed = {}
        for grp, k in zip(self.groups, subnet.removed):
            if k:
                ranks = self.space.unit_rank[grp.units]
                removed[grp.name] = tuple(torch.nonzero(ranks < k).flatten().tolist())
        return PruningPlan("nas", removed, {g.name: g.size for g in self.cg.groups}, graph_signature(self.cg.gm))

    def macs(self, subnet: Subnet) -> float:
        """The layers' multiply-accumulates the subnet keeps, as a fraction of the supernet's."""
        skipped = {n for b in self.blocks if b.add in subnet.skipped for n in b.branch}
        widths = self.space.widths(subnet.removed)
        shapes = self.space.shapes
        full = sum(s.macs for s in shapes.values())
        kept = sum(s.at(*widths[n]).macs for n, s in shapes.items() if n not in skipped)
        return kept / max(full, 1)

    def describe(self, subnet: Subnet) -> dict[str, Any]:
        return {"widths": {g.name: g.size - k for g, k in zip(self.groups, subnet.removed)},
                "skipped": list(subnet.skipped)}


class Supernet(nn.Module):
    """``gm`` with elastic widths and depths: its forward runs the active subnet (``activate``).  The parameters
    are ``gm``'s own (shared, not copied); the graph is a copy of ``gm``'s with a gate on every skippable branch."""

    def __init__(self, gm: torch.fx.GraphModule, space: ElasticSpace):
        super().__init__()
        self.space = space
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        gate_of = {b.add: (b.output, f"nas_gate_{i}") for i, b in enumerate(space.blocks)}
        for node in gm.graph.nodes:
            if node.name in gate_of:
                output, name = gate_of[node.name]
                out = next(n for n in node.all_input_nodes if n.name == output)
                gated = graph.call_function(operator.mul, (env[out], graph.get_attr(name)))
                env[node] = graph.node_copy(node, lambda n, out=out, gated=gated: gated if n is out else env[n])
            else:
                env[node] = graph.node_copy(node, lambda n: env[n])
        gates = {name: add for add, (_, name) in gate_of.items()}
        root: dict[str, Any] = {name: torch.ones(()) for name in gates}
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr") and node.target not in gates:
                root[node.target] = lookup(gm, node.target) if node.op == "get_attr" else gm.get_submodule(node.target)
        self.body = torch.fx.GraphModule(root, graph)
        self.gates = {add: self.body.get_buffer(name) for name, add in gates.items()}
        params = dict(gm.named_parameters(remove_duplicate=False))
        # parameters only: a buffer replaced by a masked copy would lose BatchNorm's running updates, and zeroed
        # weights and biases zero a channel without them
        self.targets = {name: params[name] for name in _maskable_targets(space) if name in params}
        self.active: dict[str, torch.Tensor] = {}
        self.subnet = space.largest()

    def activate(self, subnet: Subnet) -> None:
        self.space.check(subnet)
        self.subnet = subnet
        self.active = {t: m for t, m in self.space.masks(subnet).items() if t in self.targets}
        for add, gate in self.gates.items():
            gate.fill_(0.0 if add in subnet.skipped else 1.0)

    def forward(self, *args: Any) -> Any:
        if not self.active:
            return self.body(*args)
        masked = {t: self.targets[t] * m for t, m in self.active.items()}
        return torch.func.functional_call(self.body, masked, args, strict=False)


def _maskable_targets(space: ElasticSpace) -> list[str]:
    """Every tensor the smallest widths mask (a superset of what any subnet masks)."""
    return list(space.masks(Subnet(tuple(c[-1] for c in space.choices))))


def extract(gm: torch.fx.GraphModule, space: ElasticSpace, subnet: Subnet, inputs: tuple) -> torch.fx.GraphModule:
    """A copy of ``gm`` reduced to ``subnet``: its channels removed (``remove_channels`` applies the subnet's plan) and
    its skipped blocks dropped.  ``gm`` is not touched."""
    space.check(subnet)
    recipe = [{"pass": "propagate_dependencies"}, {"pass": "remove_channels"}]
    pm = pass_manager.PassManager(recipe, verify=False, check_honesty=False)
    ctx = pm.resume(gm, inputs, plans=[space.plan(subnet)])
    pm.run(ctx)
    drop_blocks(ctx.gm, space.blocks, subnet.skipped, inputs)
    return ctx.gm


def drop_blocks(gm: torch.fx.GraphModule, blocks: list[Block], skipped: Iterable[str], inputs: tuple) -> int:
    """Replace every skipped block's add by its shortcut in ``gm`` (in place) and drop the branches; the metadata
    is propagated again on ``inputs``.  Returns the number of adds removed."""
    skipped = set(skipped)
    if not skipped:
        return 0
    nodes = {n.name: n for n in gm.graph.nodes}
    dropped = 0
    for block in blocks:  # in graph order: a shortcut that was a skipped add is that add's shortcut
        add = nodes.get(block.add)
        if block.add in skipped and add is not None:
            shortcut = nodes[block.shortcut]
            if any(meta.writes_in_place(u) for u in add.users):  # relu_(x + f(x)) must not become relu_(x): x is
                with gm.graph.inserting_before(add):  # saved for backward, or read again, elsewhere
                    shortcut = gm.graph.call_method("clone", (shortcut,))
            add.replace_all_uses_with(shortcut)
            gm.graph.erase_node(add)
            nodes[block.add] = shortcut
            dropped += 1
    meta.eliminate_dead_code(gm.graph)  # the branches, nested blocks inside them included
    gm.delete_all_unused_submodules()
    gm.recompile()
    meta.propagate(gm, inputs)
    return dropped
