"""Fine-tune the compiled module on ``train_data``: the step that recovers what pruning or factorization cost.

    before:  weights as the earlier passes left them        after:  trained for ``epochs`` on (inputs, target)

Options: ``epochs``, ``lr``, ``optimizer`` (sgd with Nesterov momentum, adam, adamw), ``weight_decay``,
``momentum``, ``schedule`` (cosine, step, constant; per step), ``loss`` ("cross_entropy", "mse" or a callable
``loss(output, target)``), ``seed`` (training is deterministic on CPU for a given seed), ``patience`` (stop when
``eval_fn``, or the epoch loss without one, has not improved for that many epochs; the best weights are kept,
with ``eval_fn`` the starting ones included), ``max_steps``, ``progress`` (a tqdm bar), ``bn_l1`` (network
slimming's sparsity training: ``bn_l1`` x the sum of |gamma| over every BatchNorm is added to the loss, driving
unimportant channels' scales to zero before ``prune`` with ``criterion="slim"``).  ``train_data`` is read afresh
every epoch, so a loader that augments gives new samples each time.  Shapes never change: after remove-mode
pruning the smaller layers train as they are; after mask-mode pruning the zeroed channels (and level pruning's
zeroed weights) are re-zeroed after every step, so they stay removable.  BatchNorm trains in train mode; the
module is left in eval mode.  Under ``torchrun`` the processes share each batch through DistributedDataParallel
(``training.fit``).

Requires: train_data.  Contract: CHANGES.  Refuses a module that is already quantized (use ``qat``).
Stats: epochs_run, steps, samples, epoch_loss (one per epoch), eval (one per epoch, with eval_fn), best_epoch,
stopped_early, masked_tensors; with bn_l1: bn_gamma_below_1e-2 (share of BN scales near zero after training).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from fxcompress.passes.train.lib import training
from torch.nn.modules.batchnorm import _BatchNorm

from fxcompress.context import CompileContext
from fxcompress.errors import RecipeError
from fxcompress.pass_base import PassResult


class Finetune(training.TrainingPass):
    """Train the module on train_data (seeded, optional early stopping), keeping pruning masks."""

    name = "finetune"

    def __init__(self, bn_l1: float = 0.0, **loop: Any):
        self.set_loop(loop)
        if not isinstance(bn_l1, (int, float)) or isinstance(bn_l1, bool) or bn_l1 < 0:
            raise RecipeError(f"finetune: bn_l1 must be a number >= 0, got {bn_l1!r}.")
        self.bn_l1 = bn_l1

    def run(self, ctx: CompileContext) -> PassResult:
        training.refuse_quantized(ctx.gm, self.name)
        loss_fn = training.loss_function(self.loss, self.name)
        gammas = [m.weight for m in ctx.gm.modules() if isinstance(m, _BatchNorm) and m.weight is not None]

        def step(model: nn.Module, inputs: tuple, target: Any) -> torch.Tensor:
            loss = loss_fn(model(*inputs), target)
            if self.bn_l1 > 0 and gammas:
                loss = loss + self.bn_l1 * sum(g.abs().sum() for g in gammas)
            return loss

        stats = training.fit(ctx, self.name, self.loop, step)
        if self.bn_l1 > 0 and gammas:
            flat = torch.cat([g.detach().abs().flatten() for g in gammas])
            stats["bn_gamma_below_1e-2"] = round(float((flat < 1e-2).float().mean()), 4)
        return PassResult(modified=training.changed(stats), stats=stats)
