"""What the training passes share: checked ``(inputs, target)`` batches, losses, optimizers and schedules, seeding,
the masks of mask-mode pruning, and evaluation.

Training data is ``compile(..., train_data=batches)``: an iterable of ``(inputs, target)`` pairs, ``inputs`` a
tensor or a tuple of tensors shaped like the example inputs (any batch size).  It is iterated once per epoch, so a
list or a re-iterable loader, not a generator.  ``eval_fn(module) -> float`` (higher is better, e.g. accuracy) is
optional.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import typing
from typing import Any, Callable, Iterator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize

from fxcompress import meta
from fxcompress.context import CompileContext
from fxcompress.errors import InputError, PassError, RecipeError, VerificationError
from fxcompress.options import check_value
from fxcompress.pass_base import Contract, Pass
from fxcompress.pass_base import refuse_quantized as core_refuse
from fxcompress.plans import ChannelMasks, WeightMasks
from fxcompress.progress import progress

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
LOSSES: dict[str, Callable[..., torch.Tensor]] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


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
        yield tuple(x.clone() for x in inputs), target  # a forward (a teacher's) may write to its inputs
    if count == 0:
        raise InputError(f"[{pass_name}] train_data is empty: it yielded no batch.")


def loss_function(loss: str | Callable, pass_name: str) -> Callable[..., torch.Tensor]:
    """The loss ``(output, target) -> tensor``; a call that fails on the data is an InputError naming both shapes."""
    if not callable(loss) and loss not in LOSSES:
        raise RecipeError(f"{pass_name}: loss must be one of {', '.join(LOSSES)} or a callable, got {loss!r}.")
    fn = loss if callable(loss) else LOSSES[loss]
    name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)

    def checked(output: Any, target: Any) -> torch.Tensor:
        try:
            return fn(output, target)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            shape = lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__  # noqa: E731
            raise InputError(f"[{pass_name}] the loss {name!r} fails on the model's output {shape(output)} and the "
                             f"target {shape(target)} ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}). "
                             f"Give train_data targets this loss accepts, or choose the loss (loss=\"mse\" or a "
                             f"callable).") from exc

    return checked


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch (and any positions)."""
    classes = student.shape[1]
    s = F.log_softmax(student.movedim(1, -1).reshape(-1, classes) / temperature, dim=-1)
    t = F.log_softmax(teacher.movedim(1, -1).reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2


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
    core_refuse(gm, pass_name, f"Run {pass_name} before insert_observers (or quantize), or train the quantized model "
                               f"with qat between calibrate and lower_quantized.")


class Masks:
    """The zero masks of mask-mode pruning (``ChannelMasks``) and level pruning (``WeightMasks``), re-applied after
    every step.

    A parametrized weight (``qat``) is masked at its original; a target that no longer exists (a BatchNorm folded
    since) or changed shape (removed channels) is passed over.  ``refresh`` re-reads the plans (gradual pruning
    adds masks while it trains).
    """

    def __init__(self, ctx: CompileContext):
        self.ctx = ctx
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.refresh()

    def refresh(self) -> None:
        masks = [item for kind in (ChannelMasks, WeightMasks) for item in self.ctx.plans.get(kind, kind({})).items()]
        self.tensors = []
        for target, mask in masks:
            t = _maskable(self.ctx.gm, target)
            if t is not None and t.shape == mask.shape:
                self.tensors.append((t, mask))

    def apply(self) -> None:
        with torch.no_grad():
            for t, mask in self.tensors:
                t.mul_(mask.to(t.dtype))

    def __len__(self) -> int:
        return len(self.tensors)


def _maskable(gm: nn.Module, target: str) -> torch.Tensor | None:
    owner_name, _, attr = target.rpartition(".")
    try:
        owner = gm.get_submodule(owner_name)
    except AttributeError:
        return None
    if torch.nn.utils.parametrize.is_parametrized(owner, attr):
        return getattr(owner.parametrizations, attr).original
    t = getattr(owner, attr, None)
    return t if isinstance(t, torch.Tensor) else None


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
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"eval_fn returned {type(value).__name__}; it must return a number "
                         f"(higher is better).") from None
    if not math.isfinite(number):
        raise InputError(f"eval_fn returned {number}; it must return a finite number (higher is better). A NaN "
                         f"would make every comparison false and the training silently discarded.")
    return number


def parameters(gm: nn.Module, pass_name: str) -> list[nn.Parameter]:
    """The floating-point parameters that require gradients: parameters the user froze stay frozen."""
    params = [p for p in gm.parameters() if p.is_floating_point() and p.requires_grad]
    if not params and any(p.is_floating_point() for p in gm.parameters()):
        raise InputError(f"[{pass_name}] every parameter of the model is frozen (requires_grad=False), so there is "
                         f"nothing to train. Unfreeze the parameters to train (p.requires_grad_(True)) before "
                         f"compiling.")
    return params


def world() -> tuple[int, int]:
    """(rank, world size) of the process group the training passes share.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) without a process group, one is started with
    the gloo backend (CPU); a group the caller started is used as it is.  One process: (0, 1).
    """
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batch: tuple[tuple, Any], rank: int, size: int) -> tuple[tuple, Any]:
    """This process's share of a batch: the rank-th of ``size`` near-equal slices along the batch axis."""
    if size == 1:
        return batch
    inputs, target = batch
    part = tuple(x.tensor_split(size)[rank] for x in inputs)
    if isinstance(target, torch.Tensor) and target.dim() > 0 and target.shape[0] == inputs[0].shape[0]:
        target = target.tensor_split(size)[rank]
    return part, target


@dataclasses.dataclass
class Loop:
    """The options every training pass shares (see ``finetune``), with their defaults."""

    epochs: int = 1
    lr: float = 0.01
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    loss: str | Callable = "cross_entropy"
    seed: int = 0
    patience: int | None = None
    max_steps: int | None = None
    progress: bool | None = None

    def check(self, pass_name: str) -> None:
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise RecipeError(f"{pass_name}: epochs must be a positive integer, got {self.epochs!r}.")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise RecipeError(f"{pass_name}: lr must be a positive number, got {self.lr!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise RecipeError(f"{pass_name}: optimizer must be one of {', '.join(OPTIMIZERS)}, "
                              f"got {self.optimizer!r}.")
        if self.schedule not in SCHEDULES:
            raise RecipeError(f"{pass_name}: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise RecipeError(f"{pass_name}: weight_decay must be a number >= 0, got {self.weight_decay!r}.")
        if not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise RecipeError(f"{pass_name}: momentum must be in [0, 1), got {self.momentum!r}.")
        loss_function(self.loss, pass_name)
        for key in ("patience", "max_steps"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise RecipeError(f"{pass_name}: {key} must be a positive integer or None, got {value!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise RecipeError(f"{pass_name}: seed must be an integer, got {self.seed!r}.")


LOOP_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Loop)}


class TrainingPass(Pass):
    """A pass that trains.  Besides its own ``__init__`` arguments it takes the loop options (``LOOP_DEFAULTS``:
    epochs, lr, optimizer, weight_decay, momentum, schedule, loss, seed, patience, max_steps, progress) as
    keywords, checked by ``set_loop``."""

    contract = Contract.CHANGES
    writes_tensors = True  # the optimizer steps the parameters in place

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        own = tuple(p for p in super().option_names() if p != "loop")
        return own + tuple(k for k in LOOP_DEFAULTS if k not in own)

    def verify(self, ctx: CompileContext) -> None:
        """Training leaves no parametrization behind and every mask still holds (masked values are zero)."""
        left = [name for name, m in ctx.gm.named_modules() if torch.nn.utils.parametrize.is_parametrized(m)]
        if left:
            raise VerificationError(f"[{self.name}] left parametrized modules: {', '.join(left[:5])}.")
        masks = Masks(ctx)
        for t, mask in masks.tensors:
            if bool((t.detach() * (1 - mask.to(t.dtype))).any()):
                raise VerificationError(f"[{self.name}] left nonzero values where a pruning mask is zero.")

    def set_loop(self, options: dict[str, Any], **defaults: Any) -> None:
        """Set the loop options from ``options`` over this pass's ``defaults`` over ``LOOP_DEFAULTS``."""
        unknown = [k for k in options if k not in LOOP_DEFAULTS]
        if unknown:
            raise RecipeError(f"{self.name}: unknown option {unknown[0]!r}. Valid options: "
                              f"{', '.join(self.option_names())}.")
        hints = typing.get_type_hints(Loop)
        for key, value in options.items():
            check_value(self.name, key, value, hints[key])
        values = LOOP_DEFAULTS | defaults | options
        for key, value in values.items():
            setattr(self, key, value)
        self.loop = Loop(**values)
        self.loop.check(self.name)


LossStep = Callable[[nn.Module, tuple, Any], torch.Tensor]


def _snapshot(gm: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer by name (the weights to go back to; not a state_dict, which would also
    describe the architecture every epoch)."""
    return {k: t.detach().clone() for k, t in [*gm.named_parameters(), *gm.named_buffers()]}


def _restore(gm: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, t in [*gm.named_parameters(), *gm.named_buffers()]:
            t.copy_(snapshot[k])


def fit(ctx: CompileContext, pass_name: str, loop: Loop, loss_step: LossStep, *,
        extra: nn.Module | None = None, on_step: Callable[[int, int], bool | None] | None = None,
        epoch_batches: Callable[[int], list] | None = None, restart: int | None = None,
        module: nn.Module | None = None) -> dict[str, Any]:
    """Train ``ctx.gm`` by ``loss_step(model, inputs, target)`` for ``loop.epochs``; returns the stats.

    Each epoch reads its batches afresh (``train_data`` by default, so a loader that augments gives new samples
    every epoch) and visits them in a seeded random order.  ``extra`` holds further trainable parameters (e.g.
    feature connectors); ``on_step(step, total)`` runs before every step (schedules of masks, BN freezing) and
    returns True when it changed the masks.  Masks are re-applied after every step.  Under a process group
    (``world``) the module is wrapped in ``DistributedDataParallel`` and every process trains on its slice of each
    batch, so the gradients are those of the whole batch.  The module is left in eval mode.  With ``patience`` the
    best weights are kept: those of the best epoch, or, with ``eval_fn``, the weights before training when no epoch
    scores better (best_epoch 0).  ``module`` is what runs and is wrapped instead of ``ctx.gm`` (a supernet over
    ``ctx.gm``'s parameters); ``eval_fn`` still scores ``ctx.gm``.
    """
    gm = ctx.gm if module is None else module
    info = ctx.gm.meta.get(meta.TRACE_INFO)
    if info is not None and info.inlined_functions:
        raise PassError(f"[{pass_name}] the model's forward calls the custom autograd.Function "
                        f"{', '.join(info.inlined_functions)} directly; tracing inlined its forward and lost its "
                        f"backward, so training would compute wrong gradients. Call it from a submodule (which "
                        f"fxcompress keeps opaque, backward included) or keep that code out of the traced forward.")
    rank, size = world()
    read = epoch_batches or (lambda epoch: list(train_batches(ctx, pass_name)))
    batches = read(0)
    total = loop.epochs * len(batches) if loop.max_steps is None else min(loop.max_steps, loop.epochs * len(batches))
    masks = Masks(ctx)
    stats: dict[str, Any] = {"epoch_loss": [], "masked_tensors": len(masks)}
    evals: list[float] = []
    best, best_state, best_epoch, stale, steps, samples = None, None, 0, 0, 0, 0
    if loop.patience is not None and ctx.eval_fn is not None:
        best, best_state = evaluate(ctx), _snapshot(gm)
        stats["eval_before"] = round(best, 6)
    with seeded(loop.seed):
        params = parameters(gm, pass_name)
        extra_params = [] if extra is None else parameters(extra, pass_name)
        opt = optimizer(loop.optimizer, params + extra_params, loop.lr, loop.weight_decay, loop.momentum)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _restarted(loop.schedule, total, restart))
        model: nn.Module = gm
        if size > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(gm, broadcast_buffers=False)
        masks.apply()
        gm.train()
        shown = False if rank > 0 else loop.progress
        with progress(total, pass_name, "step", shown) as bar:
            for epoch in range(loop.epochs):
                if epoch > 0:
                    batches = read(epoch)
                order = torch.randperm(len(batches)).tolist()
                running, seen = 0.0, 0
                for i in order:
                    if steps >= total:
                        break
                    if on_step is not None and on_step(steps, total):
                        masks.refresh()  # the step changed the masks
                    inputs, target = shard(batches[i], rank, size)
                    opt.zero_grad(set_to_none=True)
                    loss = loss_step(model, inputs, target)
                    loss.backward()
                    if size > 1 and extra_params:
                        _average_gradients(extra_params, size)
                    opt.step()
                    sched.step()
                    masks.apply()
                    n = inputs[0].shape[0]
                    running, seen, steps, samples = running + loss.item() * n, seen + n, steps + 1, samples + n
                    bar.update(1)
                epoch_loss = running / max(seen, 1)
                stats["epoch_loss"].append(round(epoch_loss, 6))
                score = evaluate(ctx)
                gm.train()  # evaluate restores ctx.gm's mode, which is not the mode of a ``module`` over its layers
                if score is not None:
                    evals.append(round(score, 6))
                log.info("%s epoch %d: loss %.4f%s", pass_name, epoch + 1, epoch_loss,
                         f", eval {score:.4f}" if score is not None else "")
                metric = score if score is not None else -epoch_loss  # higher is better
                if best is None or metric > best:
                    best, best_epoch, stale = metric, epoch + 1, 0
                    if loop.patience is not None:
                        best_state = _snapshot(gm)
                else:
                    stale += 1
                if (loop.patience is not None and stale >= loop.patience) or steps >= total:
                    break
            gm.eval()
    stopped_early = loop.patience is not None and stale >= loop.patience
    if best_state is not None and best_epoch != len(stats["epoch_loss"]):
        _restore(gm, best_state)
    stats |= {"epochs_run": len(stats["epoch_loss"]), "steps": steps, "samples": samples,
              "best_epoch": best_epoch, "stopped_early": stopped_early}
    if size > 1:
        stats["processes"] = size
    if evals:
        stats["eval"] = evals
    return stats


def changed(stats: dict[str, Any]) -> bool:
    """Whether ``fit`` left different weights: it took steps and did not go back to the starting ones."""
    return stats["steps"] > 0 and stats["best_epoch"] > 0


def _restarted(name: str, total: int, restart: int | None) -> Callable[[int], float]:
    if restart is None or not 0 < restart < total:
        return schedule(name, total)
    first, second = schedule(name, restart), schedule(name, total - restart)
    return lambda step: first(step) if step < restart else second(step - restart)


def _average_gradients(params: list[nn.Parameter], size: int) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(size)
