"""What a Conv/Linear layer multiplies its weight with, collected from data: the rows of its input (features for
Linear, patches for 1-d/2-d convs) and their second moments sum(x x^T), the matrix that turns a weight error into
an output error (||X (W - W')^T||^2 = tr((W - W') X^T X (W - W')^T)).  Data-aware low-rank SVD whitens with it,
data-aware weight sharing assigns codes and refits codebooks with it.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from . import meta


def supported(module: nn.Module) -> bool:
    """Whether ``input_rows`` covers the layer: a Linear, or a conv of 1 or 2 spatial dimensions (not transposed)."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows that the weight matrix (out x in k k) multiplies: features for Linear, patches
    for a 1-d or 2-d conv (in the weight's (in, k...) order, padding applied as the conv applies it)."""
    x = x.detach()
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    k = len(module.kernel_size)
    if x.dim() == k + 1:  # unbatched
        x = x.unsqueeze(0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    size, dilation, stride = tuple(module.kernel_size), tuple(module.dilation), tuple(module.stride)
    if k == 1:
        x, size, dilation, stride = x.unsqueeze(2), (1, *size), (1, *dilation), (1, *stride)
    patches = F.unfold(x, size, dilation=dilation, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@dataclasses.dataclass
class Moments:
    """sum(x x^T) of a layer's input rows per group of a grouped conv (groups x cols x cols, float64), over
    ``rows`` rows."""
    sums: torch.Tensor
    rows: int = 0

    def mean(self) -> torch.Tensor:
        """E[x x^T] (cols x cols) of an ungrouped layer (a grouped conv's groups have a moment each: ``sums``)."""
        if self.sums.shape[0] != 1:
            raise ValueError(f"mean() of a grouped layer's moments ({self.sums.shape[0]} groups): read sums per group")
        return self.sums[0] / max(self.rows, 1)


class _Reached(Exception):
    """Every layer asked for has seen its last call of this batch: the rest of the forward is not needed."""


def input_moments(gm: torch.fx.GraphModule, layers: Sequence[nn.Module], batches: Iterable[tuple],
                  max_samples: int) -> list[Moments]:
    """The input moments of each of ``layers`` (modules of ``gm``) over ``batches`` up to about ``max_samples``
    samples, as ``gm`` computes them now (its state untouched); a forward stops once every layer has seen all of
    its calls (a layer called several times sums every call)."""
    found = [Moments(torch.zeros(getattr(m, "groups", 1), m.weight[0].numel(), m.weight[0].numel(),
                                 dtype=torch.float64)) for m in layers]
    index = {id(m): i for i, m in enumerate(layers)}
    wanted = dict.fromkeys(index, 0)  # calls per forward, from the graph
    for n in gm.graph.nodes:
        if n.op == "call_module" and id(gm.get_submodule(n.target)) in wanted:
            wanted[id(gm.get_submodule(n.target))] += 1
    stops = all(wanted.values())  # a layer called only inside an opaque module: every forward runs to its end
    calls = dict.fromkeys(index, 0)

    def hook(module: nn.Module, args: tuple) -> None:
        m = found[index[id(module)]]
        groups, cols = m.sums.shape[0], m.sums.shape[1]
        x = input_rows(module, args[0]).float()
        m.rows += x.shape[0]
        x = x.reshape(x.shape[0], groups, cols).transpose(0, 1)
        m.sums.add_(torch.bmm(x.transpose(1, 2), x).double())  # a batch in float32, the sum in float64
        calls[id(module)] += 1
        if stops and calls == wanted:
            raise _Reached

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    samples = 0
    try:
        with meta.side_effect_free(gm):
            for batch in batches:
                calls.update(dict.fromkeys(calls, 0))
                try:
                    gm(*batch)
                except _Reached:
                    pass
                samples += batch[0].shape[0]
                if samples >= max_samples:
                    break
    finally:
        for h in handles:
            h.remove()
    return found
