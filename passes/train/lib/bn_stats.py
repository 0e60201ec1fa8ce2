"""BatchNorm running statistics measured again on data (the ``recalibrate_bn`` pass; plan scoring, which judges a
pruned plan by the network that pass would leave).

    norms = tracked_norms(module)            # {name: BN with running statistics}
    samples = reestimate(module, norms, batches, max_samples)

Each BN's statistics are reset and accumulated as a cumulative average (``momentum=None`` meanwhile, as
``torch.optim.swa_utils.update_bn`` does), each BN normalising with its batch statistics as in training, every other
module in eval mode (dropout off); modes and momenta come back as they were.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.nn.modules.batchnorm import _BatchNorm


def tracked_norms(module: torch.nn.Module) -> dict[str, _BatchNorm]:
    """The BatchNorm modules of ``module`` that keep running statistics."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None}


def snapshot(norms: dict[str, _BatchNorm]) -> dict[str, list[torch.Tensor]]:
    """Copies of every buffer of ``norms`` (statistics and batch counts), to ``restore`` later."""
    return {name: [b.detach().clone() for b in m.buffers()] for name, m in norms.items()}


def restore(norms: dict[str, _BatchNorm], saved: dict[str, list[torch.Tensor]]) -> None:
    """Write a ``snapshot`` back into ``norms``'s buffers (in place: modules sharing them see it)."""
    with torch.no_grad():
        for name, m in norms.items():
            for b, old in zip(m.buffers(), saved[name]):
                b.copy_(old)


def reestimate(module: torch.nn.Module, norms: dict[str, _BatchNorm], batches: Iterable[tuple],
               max_samples: int | None = None, step: Callable[[int], None] = lambda samples: None) -> int:
    """Reset ``norms`` and average their batch statistics over ``batches`` (tuples of inputs) until
    ``max_samples``; returns the samples seen."""
    modes = {name: m.training for name, m in module.named_modules()}
    momenta = {name: m.momentum for name, m in norms.items()}
    samples = 0
    try:
        module.eval()
        for m in norms.values():
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: the exact mean over all batches seen
            m.train()
        with torch.no_grad():
            for inputs in batches:
                module(*inputs)
                samples += inputs[0].shape[0]
                step(inputs[0].shape[0])
                if max_samples is not None and samples >= max_samples:
                    break
    finally:
        for name, m in module.named_modules():
            m.train(modes[name])
        for name, m in norms.items():
            m.momentum = momenta[name]
    return samples
