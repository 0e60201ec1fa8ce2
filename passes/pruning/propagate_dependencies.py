"""``propagate_dependencies``: the channel dependency analysis as a pass.

    before:  a module                after:   the same module, and ``ctx.analyses[ChannelGraph]``: a
                                              :class:`~fxcompress.passes.pruning.lib.channel_deps.ChannelGraph`

Stats: spaces, relations, groups (prunable, fixed, partially fixed, inexact), channels, barrier ops; notes name
every barrier and every group left whole with its reason.
"""
from __future__ import annotations

from fxcompress.passes.pruning.lib.channel_deps import (
    ATTENTION_MODES,
    PRUNE_ORDER,
    ChannelGraph,
    channel_graph,
)

from fxcompress.context import CompileContext
from fxcompress.errors import RecipeError, did_you_mean
from fxcompress.pass_base import Contract, Pass, PassResult, refuse_quantized


class PropagateDependencies(Pass):
    """Channel-dependency propagation: groups of channels that must be removed together."""

    name = "propagate_dependencies"
    produces = (ChannelGraph,)
    contract = Contract.EXACT

    def __init__(self, attention: str = "dims"):
        if attention not in ATTENTION_MODES:
            raise RecipeError(f"propagate_dependencies: attention={attention!r} is not one of "
                              f"{', '.join(ATTENTION_MODES)}.{did_you_mean(attention, ATTENTION_MODES)}")
        self.attention = attention

    def run(self, ctx: CompileContext) -> PassResult:
        refuse_quantized(ctx.gm, self.name, PRUNE_ORDER)
        ctx.analyses.pop(ChannelGraph)
        cg = channel_graph(ctx, self.attention)
        groups = cg.groups
        notes = [f"{node}: {why}" for node, why in cg.rel.barriers.items()]
        notes += [f"group {g.name}: left whole: {g.fixed[0]}" for g in groups if g.fixed and not g.n_prunable]
        notes += [f"group {g.name}: inexact: {g.inexact[0]}" for g in groups if g.inexact and g.n_prunable]
        stats = {
            "spaces": len(cg.sizes),
            "relations": len(cg.rel.edges) + len(cg.rel.factor_edges),
            "groups": len(groups),
            "prunable_groups": sum(1 for g in groups if g.n_prunable),
            "fixed_groups": sum(1 for g in groups if not g.n_prunable),
            "partially_fixed_groups": sum(1 for g in groups if 0 < g.n_prunable < g.size),
            "inexact_groups": sum(1 for g in groups if g.inexact and g.n_prunable),
            "channels": sum(g.size for g in groups if not g.positional),  # position and head indices are not
            "positional_groups": sum(1 for g in groups if g.positional),
            "prunable_channels": sum(g.n_prunable for g in groups),
            "barrier_ops": len(cg.rel.barriers),
        }
        return PassResult(modified=False, stats=stats, notes=tuple(notes))
