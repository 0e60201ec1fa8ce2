"""What the training passes share: checked ``(inputs, target)`` batches, losses, optimizers and schedules, seeding,
the masks of mask-mode pruning, and evaluation.

Training data is ``compile(..., train_data=batches)``: an iterable of ``(inputs, target)`` pairs, ``inputs`` a
tensor or a tuple of tensors shaped like the example inputs (any batch size).  It is iterated once per epoch, so a
list or a re-iterable loader, not a generator.  ``eval_fn(module) -> float`` (higher is better, e.g. accuracy) is
optional.
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Callable, Iterator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxcompress.context import CompileContext
from fxcompress.errors import InputError, PassError, RecipeError

from .channel_spaces import lookup
from .remove_channels import MASKS

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
LOSSES: dict[str, Callable[..., torch.Tensor]] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
_QUANTIZED = (torch.fake_quantize_per_tensor_affine, torch.fake_quantize_per_channel_affine)


def train_batches(ctx: CompileContext, pass_name: str) -> Iterator[tuple[tuple, Any]]:
    """The batches of ``ctx.train_data`` as ``(inputs tuple, target)``, each checked against the example inputs."""
    data = ctx.train_data
    if data is None:
        raise InputError(f"[{pass_name}] no train_data: pass compile(model, inputs, recipe, train_data=batches), "
                         f"an iterable of (inputs, target) pairs.")
    if isinstance(data, (torch.Tensor, str, bytes)) or iter(data) is data:
        raise InputError(f"[{pass_name}] train_data must be a re-iterable collection of (inputs, target) batches "
                         f"(a list or a DataLoader), got a {type(data).__name__}: it is read once per epoch.")
    count = 0
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise InputError(f"[{pass_name}] train_data batch {i} is a {type(batch).__name__}; each batch must be an "
                             f"(inputs, target) pair.")
        inputs, target = batch
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        if len(inputs) != len(ctx.example_inputs):
            raise InputError(f"[{pass_name}] train_data batch {i} has {len(inputs)} inputs; the model takes "
                             f"{len(ctx.example_inputs)}.")
        for j, (x, ex) in enumerate(zip(inputs, ctx.example_inputs)):
            if not isinstance(x, torch.Tensor) or x.dtype != ex.dtype or x.shape[1:] != ex.shape[1:]:
                got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise InputError(f"[{pass_name}] train_data batch {i}, input {j} is {got}; the example input is "
                                 f"{tuple(ex.shape)} {ex.dtype} (only the batch axis may differ).")
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise InputError(f"[{pass_name}] train_data batch {i}, input {j} contains NaN/Inf values.")
        count += 1
        yield inputs, target
    if count == 0:
        raise InputError(f"[{pass_name}] train_data is empty: it yielded no batch.")


def loss_function(loss: str | Callable, pass_name: str) -> Callable[..., torch.Tensor]:
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise RecipeError(f"{pass_name}: loss must be one of {', '.join(LOSSES)} or a callable, got {loss!r}.")
    return LOSSES[loss]


def optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float,
              momentum: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def schedule(name: str, steps: int) -> Callable[[int], float]:
    """The learning-rate factor at each step."""
    if name == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
    if name == "step":
        return lambda step: 0.1 ** (3 * step // max(steps, 1))  # x0.1 at 1/3 and 2/3 of the steps
    return lambda step: 1.0


def check_options(pass_name: str, *, lr: float, epochs: int, optimizer_name: str, schedule_name: str,
                  weight_decay: float, momentum: float) -> None:
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise RecipeError(f"{pass_name}: epochs must be a positive integer, got {epochs!r}.")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise RecipeError(f"{pass_name}: lr must be a positive number, got {lr!r}.")
    if optimizer_name not in OPTIMIZERS:
        raise RecipeError(f"{pass_name}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer_name!r}.")
    if schedule_name not in SCHEDULES:
        raise RecipeError(f"{pass_name}: schedule must be one of {', '.join(SCHEDULES)}, got {schedule_name!r}.")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise RecipeError(f"{pass_name}: weight_decay must be a number >= 0, got {weight_decay!r}.")
    if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise RecipeError(f"{pass_name}: momentum must be in [0, 1), got {momentum!r}.")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic CPU training: torch's and Python's generators forked and seeded, restored afterwards."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def refuse_quantized(gm: torch.fx.GraphModule, pass_name: str) -> None:
    from fxcompress.modules import Observer

    if any(isinstance(m, Observer) for m in gm.modules()):
        raise PassError(f"[{pass_name}] the module holds quantization observers; run {pass_name} before "
                        f"insert_observers (or quantize).")
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _QUANTIZED:
            raise PassError(f"[{pass_name}] the module is already quantized (node {node.name!r}); run {pass_name} "
                            f"before quantize, or train the quantized model with qat.")


class Masks:
    """The zero masks of mask-mode pruning (``ctx.plans["channel_masks"]``), re-applied after every step."""

    def __init__(self, ctx: CompileContext):
        self.tensors = [(lookup(ctx.gm, target), mask) for target, mask in ctx.plans.get(MASKS, {}).items()]

    def apply(self) -> None:
        with torch.no_grad():
            for t, mask in self.tensors:
                if t.shape == mask.shape:
                    t.mul_(mask.to(t.dtype))

    def __len__(self) -> int:
        return len(self.tensors)


def evaluate(ctx: CompileContext) -> float | None:
    """``eval_fn`` on the module in eval mode, or None without one."""
    if ctx.eval_fn is None:
        return None
    training = ctx.gm.training
    ctx.gm.eval()
    try:
        with torch.no_grad():
            value = ctx.eval_fn(ctx.gm)
    finally:
        ctx.gm.train(training)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"eval_fn returned {type(value).__name__}; it must return a number "
                         f"(higher is better).") from None


def parameters(gm: nn.Module) -> list[nn.Parameter]:
    """The floating-point parameters, set to require gradients."""
    params = [p for p in gm.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    return params
