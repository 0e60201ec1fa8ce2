"""Re-estimate BatchNorm running statistics on data, after pruning changed what flows into them.

    before:  bn.running_mean / running_var measured on the unpruned network
    after:   the average over batches of each BN's batch mean and unbiased batch variance on the given samples

Pruning removes or zeroes channels upstream of a BatchNorm, so the statistics it normalises with no longer match its
input; re-estimating them is cheap (forwards only) and recovers much of the accuracy before any fine-tuning.  The
statistics are reset and accumulated as a cumulative average (``lib/bn_stats.py``: ``momentum=None`` during the
pass, as ``torch.optim.swa_utils.update_bn`` does; each BN normalises with its batch statistics meanwhile, as in
training), with every other module in eval mode (dropout off).  Data: ``calibration_data`` (inputs), else the inputs of ``train_data``;
``max_samples`` stops early.  ``eval_fn``, if given, is measured before and after.

Requires: nothing.  Contract: CHANGES (the statistics change by design).
Stats: bn_layers, samples, eval_before / eval_after (with eval_fn).  Skips (notes): BN without running statistics.
"""
from __future__ import annotations

from typing import Any

from fxcompress.passes.quant.calibrate import calibration_batches, grouped
from fxcompress.passes.train.lib.bn_stats import reestimate, tracked_norms
from fxcompress.passes.train.lib.training import evaluate, train_batches
from torch.nn.modules.batchnorm import _BatchNorm

from fxcompress.context import CompileContext
from fxcompress.errors import InputError, RecipeError
from fxcompress.pass_base import Contract, Pass, PassResult
from fxcompress.progress import progress


class RecalibrateBN(Pass):
    """Re-estimate BatchNorm running statistics on calibration (or training) inputs."""

    name = "recalibrate_bn"
    contract = Contract.CHANGES
    writes_tensors = True  # running statistics are updated in place

    def __init__(self, max_samples: int = 1024, batch_size: int = 64):
        for key, value in (("max_samples", max_samples), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RecipeError(f"recalibrate_bn: {key} must be a positive integer, got {value!r}.")
        self.max_samples, self.batch_size = max_samples, batch_size

    def run(self, ctx: CompileContext) -> PassResult:
        gm = ctx.gm
        norms = {name: m for name, m in gm.named_modules() if isinstance(m, _BatchNorm)}
        tracked = tracked_norms(gm)
        notes = tuple(f"{name}: no running statistics (track_running_stats=False), left as is"
                      for name in norms if name not in tracked)
        stats: dict[str, Any] = {"bn_layers": len(tracked)}
        if not tracked:
            return PassResult(False, stats | {"samples": 0}, notes + ("no BatchNorm with running statistics",))
        before = evaluate(ctx)
        with progress(self.max_samples, self.name, "sample") as bar:
            samples = reestimate(gm, tracked, (inputs for inputs, _ in grouped(self._inputs(ctx), self.batch_size)),
                                 self.max_samples, bar.update)
        stats["samples"] = samples
        if before is not None:
            stats["eval_before"], stats["eval_after"] = round(before, 6), round(evaluate(ctx), 6)
        return PassResult(True, stats, notes)

    def _inputs(self, ctx: CompileContext):
        if ctx.calibration_data is not None:
            yield from calibration_batches(ctx)
        elif ctx.train_data is not None:
            for inputs, _ in train_batches(ctx, self.name):
                yield inputs
        else:
            raise InputError("[recalibrate_bn] needs data: pass calibration_data (inputs) or train_data "
                             "((inputs, target) batches) to compile.")

