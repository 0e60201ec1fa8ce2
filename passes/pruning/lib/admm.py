"""ADMM-regularised training towards a width plan (the second half of NNI's AutoCompress).

The constraint is that the channels the plan removes are zero.  ADMM splits it off the training loss: with ``Z``
the weights projected onto the constraint and ``U`` the scaled dual variable, each round trains
``loss + rho / 2 * ||W - Z + U||^2`` for an epoch, then sets ``Z = P(W + U)`` and ``U = U + W - Z``.  The support is
the channels the plan removes in the order ``select_channels`` removes them (lowest score first), fixed for the
whole run, so ``P`` zeroes those slices and keeps the rest: ``W - Z + U`` vanishes outside them, and inside them
the penalty pulls the weights to zero round after round.  Afterwards the removed channels carry almost nothing,
and removing them changes the outputs little.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from fxcompress.passes.pruning.lib.width_space import WidthSpace
from fxcompress.passes.train.lib import training

from fxcompress.context import CompileContext
from fxcompress.fxutil import lookup


def removed_slices(space: WidthSpace, removed: list[int]) -> list[tuple[str, int, torch.Tensor]]:
    """(parameter target, dim, indices) of every parameter slice the plan removes (buffers left out)."""
    params = dict(space.cg.gm.named_parameters())
    return [(t, d, idx) for t, d, idx in space.removed_slices(removed) if t in params]


def admm(ctx: CompileContext, space: WidthSpace, removed: list[int], pass_name: str, rounds: int = 4,
         rho: float = 1e-2, loop: training.Loop | None = None) -> dict[str, Any]:
    """Train ``ctx.gm`` with ADMM towards ``removed`` (see the module docstring); returns the stats."""
    slices = removed_slices(space, removed)
    dual = {(t, d): torch.zeros_like(lookup(ctx.gm, t).detach().index_select(d, i)) for t, d, i in slices}
    loop = loop or training.Loop(epochs=1)
    criterion = training.loss_function(loop.loss, pass_name)

    def penalty(model: nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for t, d, i in slices:
            total = total + (lookup(ctx.gm, t).index_select(d, i) + dual[(t, d)]).pow(2).sum()
        return rho / 2 * total

    def loss_step(model: nn.Module, inputs: tuple, target: Any) -> torch.Tensor:
        return criterion(model(*inputs), target) + penalty(model)

    def removed_norm() -> float:
        with torch.no_grad():
            return float(sum(lookup(ctx.gm, t).index_select(d, i).pow(2).sum() for t, d, i in slices) ** 0.5)
    trace = [round(removed_norm(), 6)]
    losses = []
    for r in range(rounds):
        stats = training.fit(ctx, pass_name, loop, loss_step)
        losses += stats["epoch_loss"]
        with torch.no_grad():  # Z = P(W + U): zero on the removed slices; U = U + W - Z = U + W there
            for t, d, i in slices:
                dual[(t, d)] += lookup(ctx.gm, t).index_select(d, i)
        trace.append(round(removed_norm(), 6))
    return {"admm_rounds": rounds, "admm_rho": rho, "admm_loss": losses, "removed_weight_norm": trace,
            "admm_slices": len(slices)}
