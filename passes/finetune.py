"""Fine-tune the compiled module on ``train_data``: the step that recovers what pruning or factorization cost.

    before:  weights as the earlier passes left them        after:  trained for ``epochs`` on (inputs, target)

Options: ``epochs``, ``lr``, ``optimizer`` (sgd with Nesterov momentum, adam, adamw), ``weight_decay``,
``momentum``, ``schedule`` (cosine, step, constant; per step), ``loss`` ("cross_entropy", "mse" or a callable
``loss(output, target)``), ``seed`` (training is deterministic on CPU for a given seed), ``patience`` (stop when
``eval_fn``, or the epoch loss without one, has not improved for that many epochs; the best epoch's weights are
kept), ``max_steps``, ``progress`` (a tqdm bar).  Shapes never change: after remove-mode pruning the smaller layers
train as they are; after mask-mode pruning the zeroed channels are re-zeroed after every step
(``ctx.plans["channel_masks"]``), so they stay removable.  BatchNorm trains in train mode; the module is left in eval
mode.

Requires: train_data.  Contract: CHANGES.  Refuses a module that is already quantized (use ``qat``).
Stats: epochs_run, steps, samples, epoch_loss (one per epoch), eval (one per epoch, with eval_fn), best_epoch,
stopped_early, masked_tensors.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch
from tqdm import tqdm

from fxcompress.context import CompileContext
from fxcompress.errors import RecipeError
from fxcompress.pass_base import Contract, Pass, PassResult

from . import training

log = logging.getLogger(__name__)


class Finetune(Pass):
    """Train the module on train_data (seeded, optional early stopping), keeping pruning masks."""

    name = "finetune"
    contract = Contract.CHANGES

    def __init__(self, epochs: int = 1, lr: float = 0.01, optimizer: str = "sgd", weight_decay: float = 5e-4,
                 momentum: float = 0.9, schedule: str = "cosine", loss: str | Callable = "cross_entropy",
                 seed: int = 0, patience: int | None = None, max_steps: int | None = None,
                 progress: bool | None = None):
        training.check_options("finetune", lr=lr, epochs=epochs,
                               optimizer_name=optimizer, schedule_name=schedule, weight_decay=weight_decay,
                               momentum=momentum)
        for key, value in (("patience", patience), ("max_steps", max_steps)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise RecipeError(f"finetune: {key} must be a positive integer or None, got {value!r}.")
        training.loss_function(loss, "finetune")
        self.epochs, self.lr, self.optimizer, self.weight_decay = epochs, lr, optimizer, weight_decay
        self.momentum, self.schedule, self.loss, self.seed = momentum, schedule, loss, seed
        self.patience, self.max_steps, self.progress = patience, max_steps, progress

    def run(self, ctx: CompileContext) -> PassResult:
        gm = ctx.gm
        training.refuse_quantized(gm, self.name)
        loss_fn = training.loss_function(self.loss, self.name)
        batches = list(training.train_batches(ctx, self.name))  # checked once; re-read every epoch
        total = self.epochs * len(batches) if self.max_steps is None else min(self.max_steps,
                                                                               self.epochs * len(batches))
        masks = training.Masks(ctx)
        stats: dict[str, Any] = {"epoch_loss": [], "masked_tensors": len(masks)}
        evals: list[float] = []
        best, best_state, best_epoch, stale, steps, samples = None, None, 0, 0, 0, 0
        with training.seeded(self.seed):
            params = training.parameters(gm)
            opt = training.optimizer(self.optimizer, params, self.lr, self.weight_decay, self.momentum)
            factor = training.schedule(self.schedule, total)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            masks.apply()
            gm.train()
            bar = tqdm(total=total, unit="step", desc=self.name,
                       disable=self.progress is False if self.progress is not None else None, leave=False)
            try:
                for epoch in range(self.epochs):
                    order = torch.randperm(len(batches)).tolist()
                    running, seen = 0.0, 0
                    for i in order:
                        if steps >= total:
                            break
                        inputs, target = batches[i]
                        opt.zero_grad(set_to_none=True)
                        out = gm(*inputs)
                        loss = loss_fn(out, target)
                        loss.backward()
                        opt.step()
                        sched.step()
                        masks.apply()
                        n = inputs[0].shape[0]
                        running, seen, steps, samples = running + loss.item() * n, seen + n, steps + 1, samples + n
                        bar.update(1)
                    epoch_loss = running / max(seen, 1)
                    stats["epoch_loss"].append(round(epoch_loss, 6))
                    score = training.evaluate(ctx)
                    if score is not None:
                        evals.append(round(score, 6))
                    log.info("%s epoch %d: loss %.4f%s", self.name, epoch + 1, epoch_loss,
                             f", eval {score:.4f}" if score is not None else "")
                    metric = score if score is not None else -epoch_loss  # higher is better
                    if best is None or metric > best:
                        best, best_epoch, stale = metric, epoch + 1, 0
                        if self.patience is not None:
                            best_state = copy.deepcopy(gm.state_dict())
                    else:
                        stale += 1
                    if (self.patience is not None and stale >= self.patience) or steps >= total:
                        break
            finally:
                bar.close()
                gm.eval()
        stopped_early = self.patience is not None and stale >= self.patience
        if stopped_early and best_state is not None:
            gm.load_state_dict(best_state)
        stats |= {"epochs_run": len(stats["epoch_loss"]), "steps": steps, "samples": samples,
                  "best_epoch": best_epoch, "stopped_early": stopped_early}
        if evals:
            stats["eval"] = evals
        return PassResult(modified=steps > 0, stats=stats)
