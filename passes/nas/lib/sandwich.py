"""Training a supernet once for all its subnets: the sandwich rule with in-place distillation (BigNAS / OFA).

Every step runs the largest subnet on the batch's targets, then the smallest and ``random_subnets`` random ones on
the largest's outputs (detached) as soft targets, each forward followed by its backward, so one optimizer step
holds the gradients of all of them.  Soft targets: for a classification loss, KL divergence between
softmax outputs (temperature ``temperature``, ``training.kd_loss``); for any other loss, that loss against the
largest's outputs.  The loop is the training passes' (``training.fit``: seeded, schedules, DistributedDataParallel
under torchrun, every rank drawing the same subnets from the same seeded generator).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from fxcompress.passes.nas.lib.elastic import Supernet
from fxcompress.passes.train.lib import training

from fxcompress.context import CompileContext


def soft_loss(loss: Any, temperature: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The in-place distillation loss of a subnet's output against the largest's."""
    if loss == "cross_entropy" or loss is F.cross_entropy:
        return lambda out, soft: training.kd_loss(out, soft, temperature)
    fn = training.loss_function(loss, "nas")
    return lambda out, soft: fn(out, soft)


def train(ctx: CompileContext, net: Supernet, loop: training.Loop, random_subnets: int = 2,
          temperature: float = 1.0, pass_name: str = "nas") -> dict[str, Any]:
    """Train ``net`` (over ``ctx.gm``'s parameters) by the sandwich rule for ``loop``; returns ``fit``'s stats and
    the subnets trained per step.  The largest subnet is left active."""
    space = net.space
    hard = training.loss_function(loop.loss, pass_name)
    soft = soft_loss(loop.loss, temperature)
    rng = np.random.default_rng(loop.seed)
    smallest = space.smallest()

    def step(model: torch.nn.Module, inputs: tuple, target: Any) -> torch.Tensor:
        net.activate(space.largest())
        out = model(*inputs)
        loss = hard(out, target)
        teacher = out.detach()
        total = loss.detach()
        for subnet in [smallest, *(space.sample(rng) for _ in range(random_subnets))]:
            loss.backward()
            net.activate(subnet)
            loss = soft(model(*inputs), teacher)
            total = total + loss.detach()
        return loss + (total - loss.detach())  # reported: the sum over subnets; backward: the last one's

    stats = training.fit(ctx, pass_name, loop, step, module=net)
    net.activate(space.largest())
    stats["subnets_per_step"] = 2 + random_subnets
    return stats

