"""How good a width plan is, without pruning: the channels it removes are zeroed in every member of their groups
(as ``remove_channels`` mode="mask" does) in a private copy of the module, which is then scored.

    quality = PlanQuality(gm, channel_graph, space, batches, eval_fn=None)
    quality(removed)          # eval_fn(module) when given (higher is better), else SQNR in dB of the outputs
                              # against the unpruned module's on the calibration batches

Zeroing a group's channels in all its members gives the outputs removal gives for every group whose path has no
channel-mixing normalisation (LayerNorm / GroupNorm over channels, softmax over channels); for those ("inexact"
groups) the score is a proxy.  The copy's tensors are restored after every evaluation, so the order of evaluations
does not matter, and ``gm`` itself is never written.  With training batches and ``tune_steps``, every plan is
fine-tuned that many steps before it is scored (NetAdapt's short-term fine-tune), the removed channels held at zero.
With ``recalibrate_bn``, the BatchNorm statistics are re-estimated on the calibration batches for every plan before it
is scored (EagleEye's adaptive BN), and the SQNR's reference is the unpruned network with statistics re-estimated on
the same batches: pruned channels shift what flows into every BN downstream, and the stale
statistics, which ``recalibrate_bn`` and fine-tuning replace anyway, would make an early layer's cut look ruinous
(VGG-small's first conv at 16 of 32 channels: relative output noise 11.5 with the old statistics, 0.025 with
re-estimated ones).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
import torch.fx
import torch.nn.functional as F
from fxcompress.passes.pruning.lib.channel_deps import ChannelGraph
from fxcompress.passes.pruning.lib.width_space import WidthSpace
from fxcompress.passes.train.lib import bn_stats
from torch.utils import _pytree as pytree

from fxcompress import instruments
from fxcompress.errors import InputError
from fxcompress.fxutil import lookup
from fxcompress.meta import side_effect_free
from fxcompress.tree import copy_tree

RECALIBRATION_SAMPLES = 32
"""Fewest samples BatchNorm statistics are re-estimated from: fewer give statistics noisier than the stale ones."""
SQNR_CAP = 200.0  # dB: the score of outputs equal to the reference


def _flat_output(out: object) -> torch.Tensor:
    leaves = [t.detach().float().flatten() for t in pytree.tree_leaves(out)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.cat(leaves) if leaves else torch.zeros(0)


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    """``instruments.sqnr_db`` capped at ``SQNR_CAP`` dB: identical outputs score the cap, not infinity, so that
    scores stay finite numbers a search can rank, average and write to JSON."""
    return min(instruments.sqnr_db(reference, output), SQNR_CAP)


class PlanQuality:
    """Scores width plans on a masked copy of ``gm`` (see the module docstring); counts its evaluations."""

    def __init__(self, gm: torch.fx.GraphModule, cg: ChannelGraph, space: WidthSpace, batches: Iterable[tuple],
                 eval_fn: Callable[[torch.nn.Module], float] | None = None, max_batches: int = 2,
                 train: list[tuple[tuple, object]] | None = None, tune_steps: int = 0, lr: float = 0.01,
                 loss: Callable[..., torch.Tensor] = F.cross_entropy, recalibrate_bn: bool = False):
        self.cg, self.space, self.eval_fn = cg, space, eval_fn
        self.module = copy_tree(gm).eval()
        self.batches = []
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            self.batches.append(tuple(batch) if isinstance(batch, (tuple, list)) else (batch,))
        if eval_fn is None and not self.batches:
            raise InputError("scoring width plans needs an eval_fn or calibration data (compile(..., "
                             "calibration_data=...)).")
        self.originals: dict[str, torch.Tensor] = {}
        self.evaluations = 0
        self.cache: dict[tuple[int, ...], float] = {}
        self.train, self.tune_steps, self.lr, self.loss = train or [], tune_steps, lr, loss
        self.norms = bn_stats.tracked_norms(self.module) if recalibrate_bn and self.batches else {}
        self.recalibration_skipped: str | None = None
        samples = sum(b[0].shape[0] for b in self.batches if b and isinstance(b[0], torch.Tensor) and b[0].dim())
        if self.norms and samples < RECALIBRATION_SAMPLES:
            self.norms, self.recalibration_skipped = {}, (
                f"BatchNorm statistics not re-estimated: the calibration batches scored hold {samples} samples, "
                f"fewer than {RECALIBRATION_SAMPLES}; give calibration_data")
        # the reference: the unpruned network, its statistics re-estimated on the same batches when a plan's are
        # (so the noise is the plan's alone, and the unpruned plan has none)
        self.reference = []
        if eval_fn is None:
            with self._recalibrated():
                self.reference = [self._outputs(b) for b in self.batches]

    def _outputs(self, batch: tuple) -> torch.Tensor:
        with torch.no_grad(), side_effect_free(self.module):
            return _flat_output(self.module(*batch))

    def _mask(self, removed: list[int]) -> list[tuple[str, int, torch.Tensor]]:
        zeroed = self.space.removed_slices(removed)
        self._zero(zeroed)
        return zeroed

    def _zero(self, zeroed: list[tuple[str, int, torch.Tensor]]) -> None:
        with torch.no_grad():
            for target, dim, idx in zeroed:
                t = lookup(self.module, target)
                if target not in self.originals:
                    self.originals[target] = t.detach().clone()
                t.index_fill_(dim, idx, 0.0)

    def _restore(self, zeroed: list[tuple[str, int, torch.Tensor]]) -> None:
        with torch.no_grad():
            for target in dict.fromkeys(target for target, _, _ in zeroed):
                lookup(self.module, target).copy_(self.originals[target])

    def _tune(self, zeroed: list[tuple[str, int, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """NetAdapt's short-term fine-tune: ``tune_steps`` SGD steps on the training batches, the removed channels
        zeroed again after every step; returns the state to restore."""
        state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        params = [q for q in self.module.parameters() if q.requires_grad]
        opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        self.module.train()
        with torch.enable_grad():
            for step in range(self.tune_steps):
                inputs, target = self.train[step % len(self.train)]
                opt.zero_grad(set_to_none=True)
                self.loss(self.module(*inputs), target).backward()
                opt.step()
                self._zero(zeroed)
        self.module.eval()
        return state

    @contextlib.contextmanager
    def _recalibrated(self):
        """The BNs' statistics re-estimated on the batches for the plan in place (``recalibrate_bn``), restored
        afterwards; nothing without ``recalibrate_bn``."""
        if not self.norms:
            yield
            return
        saved = bn_stats.snapshot(self.norms)
        try:
            bn_stats.reestimate(self.module, self.norms, self.batches)
            yield
        finally:
            bn_stats.restore(self.norms, saved)

    def _score(self) -> float:
        if self.eval_fn is not None:
            return float(self.eval_fn(self.module))
        return sqnr_db(torch.cat(self.reference), torch.cat([self._outputs(b) for b in self.batches]))

    def __call__(self, removed: Iterable[int]) -> float:
        removed = [int(k) for k in removed]
        key = tuple(removed)
        if key in self.cache:
            return self.cache[key]
        zeroed = self._mask(removed)
        state = self._tune(zeroed) if self.tune_steps and self.train else None
        try:
            with self._recalibrated():
                value = self._score()
        finally:
            if state is not None:
                self.module.load_state_dict(state)
            self._restore(zeroed)
        self.evaluations += 1
        self.cache[key] = value
        return value
