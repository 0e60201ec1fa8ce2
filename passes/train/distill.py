"""Train the compiled module (the student) under a teacher: knowledge distillation in its three kinds.

    before:  the student as the earlier passes left it (pruned, factorized)
    after:   trained on train_data with the teacher's outputs as (part of) its targets

``variant``:
- ``"offline"`` (default): loss = ``alpha`` x T^2 x KL(softmax(teacher / T) || softmax(student / T)) +
  (1 - ``alpha``) x ``loss``(student, target), with ``temperature`` T and ``alpha`` 0.9 unless given (Hinton et
  al.).  The teacher is the model given to ``compile`` (before any pass) unless a ``teacher`` module is given.
- ``"semi_supervised"``: the teacher labels unlabeled inputs (``calibration_data``) with its argmax, keeping those
  whose top probability reaches ``confidence``; the student then trains on those pseudo-labels, together with
  ``train_data``'s labelled batches when there are any.
- ``"self"`` (snapshot distillation): the student trains on ``loss`` alone for a first learning-rate cycle; a
  frozen copy of it then teaches the last ``self_epochs`` epochs (a quarter unless given), run as a second cycle
  with the offline loss (``alpha`` 0.5 unless given).

``features`` adds feature distillation: pairs ``[student_module, teacher_module]`` (or one name for both) whose
outputs are matched by mean squared error, weighted by ``feature_weight``.  Where the student's channels are fewer
(pruned), a trainable 1x1 convolution (4-d features) or linear map (channels last) lifts them to the teacher's; the
connectors are dropped after training.  The training loop, its options and stats are ``finetune``'s
(``training.fit``): seeded, per-epoch logging, early stopping, masks kept, DistributedDataParallel under torchrun.

Requires: train_data (``semi_supervised``: calibration_data, train_data optional).  Contract: CHANGES.
Stats: finetune's, plus variant, temperature, alpha; pseudo_labeled / pseudo_kept (semi_supervised);
self_teacher_step (self: the step whose checkpoint teaches); feature_pairs, feature_loss (mean over steps).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from fxcompress.passes.quant.calibrate import calibration_batches
from fxcompress.passes.train.lib import training

from fxcompress.context import CompileContext
from fxcompress.errors import InputError, RecipeError, did_you_mean
from fxcompress.pass_base import PassResult

VARIANTS = ("offline", "semi_supervised", "self")


class Distill(training.TrainingPass):
    """Knowledge distillation: offline KD, semi-supervised pseudo-labels, self-distillation; optional features."""

    name = "distill"

    def __init__(self, variant: str = "offline", temperature: float = 4.0, alpha: float | None = None,
                 teacher: nn.Module | None = None, self_epochs: int | None = None, confidence: float = 0.0,
                 features: list | None = None, feature_weight: float = 1.0, **loop: Any):
        self.set_loop(loop)
        if variant not in VARIANTS:
            raise RecipeError(f"distill: variant must be one of {', '.join(VARIANTS)}, got {variant!r}.")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise RecipeError(f"distill: temperature must be a positive number, got {temperature!r}.")
        alpha = (0.5 if variant == "self" else 0.9) if alpha is None else alpha
        for key, value in (("alpha", alpha), ("confidence", confidence)):
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise RecipeError(f"distill: {key} must be in [0, 1], got {value!r}.")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise RecipeError(f"distill: teacher must be an nn.Module (or None: the model given to compile), "
                              f"got {type(teacher).__name__}.")
        epochs = self.epochs
        if variant == "self":
            if epochs < 2:
                raise RecipeError("distill: variant 'self' needs epochs >= 2 (a checkpoint, then epochs it teaches).")
            self_epochs = max(1, epochs // 4) if self_epochs is None else self_epochs
            if not isinstance(self_epochs, int) or not 1 <= self_epochs < epochs:
                raise RecipeError(f"distill: self_epochs must be an integer from 1 to epochs - 1 ({epochs - 1}), "
                                  f"got {self_epochs!r}.")
        if not isinstance(feature_weight, (int, float)) or feature_weight < 0:
            raise RecipeError(f"distill: feature_weight must be a number >= 0, got {feature_weight!r}.")
        self.pairs = _feature_pairs(features)
        self.variant, self.temperature, self.alpha, self.teacher = variant, temperature, alpha, teacher
        self.self_epochs, self.confidence, self.features, self.feature_weight = self_epochs, confidence, features, \
            feature_weight

    def run(self, ctx: CompileContext) -> PassResult:
        training.refuse_quantized(ctx.gm, self.name)
        loss_fn = training.loss_function(self.loss, self.name)
        stats: dict[str, Any] = {"variant": self.variant}
        teacher = self._teacher(ctx)
        with training.seeded(self.seed):  # the connectors' initial weights
            matcher = _FeatureMatcher(ctx, self.pairs, teacher) if self.pairs else None
        epoch_batches = None
        if self.variant == "semi_supervised":
            pseudo, seen = self._pseudo_labeled(ctx, teacher)
            labelled = (lambda: list(training.train_batches(ctx, self.name)) if ctx.train_data is not None  # noqa: E731
                        else [])
            stats |= {"pseudo_labeled": seen, "pseudo_kept": sum(int(b[0][0].shape[0]) for b in pseudo)}
            if not pseudo and ctx.train_data is None:
                raise InputError(f"[distill] no teacher prediction reached confidence {self.confidence} and there is "
                                 f"no train_data: lower confidence.")
            epoch_batches = lambda epoch: labelled() + pseudo  # noqa: E731  (train_data read afresh each epoch)
        else:
            stats |= {"temperature": self.temperature, "alpha": self.alpha}
        state: dict[str, Any] = {"teacher": None if self.variant == "self" else teacher}
        boundary = None
        if self.variant == "self":
            steps_per_epoch = len(list(training.train_batches(ctx, self.name)))
            boundary = (self.epochs - self.self_epochs) * steps_per_epoch
            if self.loop.max_steps is not None:
                boundary = min(boundary, self.loop.max_steps - 1)

        def on_step(step: int, total: int) -> None:
            if boundary is not None and step == boundary:
                state["teacher"] = frozen_copy(ctx.gm)  # the snapshot that teaches the rest
                stats["self_teacher_step"] = step

        def step(model: nn.Module, inputs: tuple, target: Any) -> torch.Tensor:
            out = model(*inputs)
            t = state["teacher"]
            t_out = None
            if matcher is not None:  # the teacher's features (and, when it is the same teacher, its outputs)
                with torch.no_grad():
                    features_out = matcher.teacher(*inputs)
                t_out = features_out if t is matcher.teacher else None
            if self.variant == "semi_supervised" or t is None:
                loss = loss_fn(out, target)
            else:
                if t_out is None:
                    with torch.no_grad():
                        t_out = t(*inputs)
                _check_outputs(out, t_out)
                loss = self.alpha * training.kd_loss(out, t_out, self.temperature)
                if self.alpha < 1:
                    loss = loss + (1 - self.alpha) * loss_fn(out, target)
            if matcher is not None:
                loss = loss + self.feature_weight * matcher.loss()
            return loss

        try:
            stats |= training.fit(ctx, self.name, self.loop, step, extra=matcher.connectors if matcher else None,
                                  on_step=on_step, epoch_batches=epoch_batches, restart=boundary)
        finally:
            if matcher is not None:
                matcher.close()
        if matcher is not None:
            stats |= {"feature_pairs": len(self.pairs), "feature_loss": round(matcher.mean(), 6)}
        return PassResult(modified=training.changed(stats), stats=stats)

    def _teacher(self, ctx: CompileContext) -> nn.Module | None:
        if self.variant == "self" and not self.pairs:
            return None
        source = self.teacher if self.teacher is not None else ctx.model
        if source is None:
            raise InputError("[distill] no teacher: pass teacher=module, or compile a model (its original is the "
                             "default teacher).")
        return frozen_copy(source)

    def _pseudo_labeled(self, ctx: CompileContext, teacher: nn.Module) -> tuple[list, int]:
        if ctx.calibration_data is None:
            raise InputError("[distill] variant 'semi_supervised' labels unlabeled inputs: pass them as "
                             "compile(..., calibration_data=batches).")
        batches, seen = [], 0
        with torch.no_grad():
            for inputs in calibration_batches(ctx):
                out = teacher(*inputs)
                if not isinstance(out, torch.Tensor) or out.dim() < 2:
                    raise InputError("[distill] semi_supervised needs a teacher returning class scores "
                                     "(batch, classes).")
                prob, label = F.softmax(out, dim=1).max(dim=1)
                keep = prob >= self.confidence
                seen += int(label.shape[0])
                if bool(keep.any()):
                    batches.append((tuple(x[keep] for x in inputs), label[keep]))
        return batches, seen


def frozen_copy(module: nn.Module) -> nn.Module:
    """A teacher: an eval-mode copy of ``module`` whose parameters take no gradient."""
    teacher = copy.deepcopy(module).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _check_outputs(student: Any, teacher: Any) -> None:
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise InputError("[distill] the student and the teacher must each return one tensor of scores, got "
                         f"{type(student).__name__} and {type(teacher).__name__}.")
    if student.dim() < 2:
        raise InputError(f"[distill] the student returns shape {tuple(student.shape)}; distillation needs class "
                         f"scores of shape (batch, classes, ...).")
    if student.shape != teacher.shape:
        raise InputError(f"[distill] the student returns {tuple(student.shape)} but the teacher "
                         f"{tuple(teacher.shape)}: distillation needs outputs of the same shape.")


def _feature_pairs(features: list | None) -> list[tuple[str, str]]:
    if features is None:
        return []
    if not isinstance(features, (list, tuple)):
        raise RecipeError(f"distill: features must be a list of module names or [student, teacher] pairs, "
                          f"got {type(features).__name__}.")
    pairs = []
    for item in features:
        if isinstance(item, str):
            pairs.append((item, item))
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(s, str) for s in item):
            pairs.append((item[0], item[1]))
        else:
            raise RecipeError(f"distill: each features entry is a module name or a [student, teacher] pair of "
                              f"names, got {item!r}.")
    return pairs


class _Tap(nn.Module):
    """Returns its input unchanged and keeps it (the student's feature at one graph node)."""

    def __init__(self):
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, x):
        self.value = x
        return x


class _FeatureMatcher:
    """The matched features: taps in the student's graph, forward hooks on the teacher's modules, trainable
    connectors, and the MSE between them.

    A student feature is named by a graph node (``add_3``) or a module: the output of the last node traced inside
    that module (a leaf like ``layer2.0.conv1``, or a container like ``layer2``, whose last node is its output).
    A teacher feature is a module of the teacher, captured by a forward hook.  ``close`` removes the taps.
    """

    def __init__(self, ctx: CompileContext, pairs: list[tuple[str, str]], teacher: nn.Module):
        self.gm, self.teacher, self.pairs = ctx.gm, teacher, pairs
        self.teacher_out: dict[str, torch.Tensor] = {}
        self.handles, self.taps = [], []
        teacher_modules = dict(teacher.named_modules())
        for i, (s, t) in enumerate(pairs):
            if not t or t not in teacher_modules:
                raise InputError(f"[distill] feature module {t!r} is not a module of the teacher."
                                 f"{did_you_mean(t, teacher_modules)}")
            self.handles.append(teacher_modules[t].register_forward_hook(self._store(t)))
            self.taps.append(self._tap(_student_node(ctx.gm, s), i))
        ctx.gm.recompile()
        with torch.no_grad():
            was = ctx.gm.training
            ctx.gm.eval()
            ctx.gm(*ctx.example_inputs)
            ctx.gm.train(was)
            teacher(*ctx.example_inputs)
        self.connectors = nn.ModuleDict({str(i): _connector(s, self._student(i), t, self.teacher_out[t])
                                         for i, (s, t) in enumerate(pairs)})
        self.total, self.count = 0.0, 0

    def _tap(self, node: torch.fx.Node, i: int) -> torch.fx.Node:
        name = f"_distill_tap_{i}"
        self.gm.add_submodule(name, _Tap())
        with self.gm.graph.inserting_after(node):
            tap = self.gm.graph.call_module(name, (node,))
        tap.meta = dict(node.meta)
        node.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)
        return tap

    def _student(self, i: int) -> torch.Tensor:
        value = self.gm.get_submodule(f"_distill_tap_{i}").value
        if not isinstance(value, torch.Tensor):
            raise InputError(f"[distill] student feature {self.pairs[i][0]!r} is a {type(value).__name__}, not a "
                             f"tensor: pick a node or module with one tensor output.")
        return value

    def _store(self, name: str):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise InputError(f"[distill] teacher feature module {name!r} returns a {type(output).__name__}, "
                                 f"not a tensor: pick a module with one tensor output.")
            self.teacher_out[name] = output
        return hook

    def loss(self) -> torch.Tensor:
        """The mean over pairs of the MSE between the last forwards' features (student, then teacher)."""
        terms = [F.mse_loss(self.connectors[str(i)](self._student(i)), self.teacher_out[t].detach())
                 for i, (s, t) in enumerate(self.pairs)]
        value = torch.stack(terms).mean()
        self.total, self.count = self.total + float(value.detach()), self.count + 1
        return value

    def mean(self) -> float:
        return self.total / max(self.count, 1)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for tap in self.taps:
            tap.replace_all_uses_with(tap.args[0])
            self.gm.graph.erase_node(tap)
            self.gm.delete_submodule(tap.target)
        self.gm.recompile()


def _student_node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    for node in nodes:
        if node.name == name:
            return node
    inside = [n for n in nodes if (n.op == "call_module" and (n.target == name or n.target.startswith(name + ".")))
              or any(k == name or k.startswith(name + ".") for k in (n.meta.get("nn_module_stack") or {}))]
    if not name or not inside:
        modules = [n for n, _ in gm.named_modules() if n]
        raise InputError(f"[distill] student feature {name!r} is neither a graph node nor a module of the compiled "
                         f"module.{did_you_mean(name, modules + [n.name for n in nodes])}")
    return inside[-1]


def _connector(s_name: str, s: torch.Tensor, t_name: str, t: torch.Tensor) -> nn.Module:
    """Identity when the shapes agree; else a 1x1 conv over dim 1 (4-d) or a linear map over the last dim."""
    if s.shape[1:] == t.shape[1:]:
        return nn.Identity()
    if s.dim() == 4 and t.dim() == 4 and s.shape[2:] == t.shape[2:]:
        return nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
    if s.dim() == t.dim() and s.shape[1:-1] == t.shape[1:-1]:
        return nn.Linear(s.shape[-1], t.shape[-1], bias=False)
    raise InputError(f"[distill] feature {s_name!r} has shape {tuple(s.shape)} and {t_name!r} {tuple(t.shape)}: "
                     f"they may differ only in channels (dim 1 of 4-d tensors, or the last dim).")
