"""Quantization-aware training: train the calibrated model through the quantization it will be lowered with.

    before:  observers calibrated (insert_observers, calibrate)         after:  weights (and scales) trained
    recipe:  fold_bn -> insert_observers -> calibrate -> qat -> lower_quantized   (lowering and export unchanged)

While it trains, every calibrated activation site fake-quantizes with its calibrated scale and zero point, and
every quantized weight is fake-quantized as ``lower_quantized`` will quantize it (symmetric, per channel by default,
from its current range), with the straight-through estimator: the rounding passes gradients through unchanged inside
the range and stops them outside.  ``learn_scales=True`` makes the activation scales trainable (LSQ, Esser et al.,
with its gradient scale 1/sqrt(numel x qmax)); the trained scales become the sites' parameters.

BatchNorm folded in training (``fold_bn_training``, on by default, for the Conv/Linear layers ``fold_bn`` folded),
as in Jacob et al. and Krishnamoorthi's whitepaper: the layer trains its unfolded weight W, bias b and the BN's gamma
and beta, and convolves with the fake-quantized folded weight W * gamma / sigma (sigma from the running variance).
For the first ``freeze_bn_steps`` steps the output is rescaled by sigma / gamma and normalised with the batch's
statistics, as BatchNorm trains (gradients through the batch statistics; running statistics updated with
``bn_momentum``, 0.1, or None for the average of all batches); from then on the statistics are frozen and the layer
computes exactly the folded conv with bias beta + (b - mu) * gamma / sigma that inference will use.  The default,
0, freezes at once: QAT here starts from a trained, calibrated model whose statistics are already right, and on the
hard-digits models (W4A8, 3 epochs) freezing at once gave 87.2 % (ResNet-20) and 76.4 % (MobileNetV2) against 86.1
and 75.0 % when freezing at half the steps, and 84.7 / 76.7 % without BN in training.  Afterwards the layer holds
the folded weight and bias again, and the observers are back in place for ``lower_quantized``.

Options: ``finetune``'s (epochs, lr, optimizer, ...; lr 1e-3 by default), ``learn_scales``, ``fold_bn_training``,
``freeze_bn_steps``, ``bn_momentum``.  Requires: quant_plan, quant_params, train_data.  Contract: CHANGES.
Stats: finetune's, plus activation_sites, weights, bn_folded_in_training, bn_frozen_at, scales_changed (largest
relative change of a learned scale).  Skips (notes): a folded layer whose weight changed since ``fold_bn``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from fxcompress.passes.quant.fold_bn import FoldedBN, FoldedBNs
from fxcompress.passes.quant.insert_observers import HOLDER
from fxcompress.passes.quant.lib.quant_plan import QuantPlan, WeightSite
from fxcompress.passes.quant.lib.quant_spec import FakeQuant, QuantParams
from fxcompress.passes.quant.lower_quantized import weight_fake_quant
from fxcompress.passes.train.lib import training
from torch.nn.utils import parametrize

from fxcompress import ops
from fxcompress.context import CompileContext
from fxcompress.errors import PassError, RecipeError
from fxcompress.pass_base import PassResult


class _ActFakeQuant(nn.Module):
    """An activation site while training: fake-quantized on its grid (STE), the scale trainable with LSQ."""

    def __init__(self, fq: FakeQuant, learn: bool):
        super().__init__()
        self.fq, self.learn = fq, learn
        scale = fq.scale.detach().clone().float().reshape(1)
        self.scale = nn.Parameter(scale) if learn else None
        self.register_buffer("zero", fq.zero.detach().clone().float().reshape(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            return x
        if not self.learn:
            return self.fq.apply(x)
        grad_factor = 1.0 / math.sqrt(max(x.numel(), 1) * self.fq.qmax)
        scale = self.scale.abs().clamp(min=torch.finfo(torch.float32).tiny)
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, self.zero, self.fq.qmin, self.fq.qmax,
                                                                grad_factor)

    def trained(self) -> FakeQuant:
        if not self.learn:
            return self.fq
        scale = self.scale.detach().abs().reshape(self.fq.scale.shape).clone()
        return FakeQuant(scale, self.fq.zero, self.fq.qmin, self.fq.qmax, self.fq.axis)


class _BNState(nn.Module):
    """A folded BatchNorm while training: gamma and beta trainable, running statistics updated until frozen."""

    def __init__(self, rec: FoldedBN, momentum: float | None):
        super().__init__()
        self.gamma, self.beta = nn.Parameter(rec.gamma.clone()), nn.Parameter(rec.beta.clone())
        self.register_buffer("mean", rec.mean.clone())
        self.register_buffer("var", rec.var.clone())
        self.eps, self.momentum, self.frozen, self.updates = rec.eps, momentum, False, 0

    def scale(self) -> torch.Tensor:
        return self.gamma / torch.sqrt(self.var + self.eps)

    @torch.no_grad()
    def update(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """Move the running statistics towards a batch's (``var`` biased over ``n`` values per channel)."""
        if self.frozen:
            return
        self.updates += 1
        rate = 1.0 / self.updates if self.momentum is None else self.momentum  # None: the average of all batches
        self.mean.mul_(1 - rate).add_(mean, alpha=rate)
        self.var.mul_(1 - rate).add_(var * n / max(n - 1, 1), alpha=rate)


class _FoldedWeight(nn.Module):
    """Parametrization of a weight: W -> fake_quant(W * gamma / sigma) (BN folded), or fake_quant(W)."""

    def __init__(self, site: WeightSite, bn: _BNState | None):
        super().__init__()
        self.site, self.bn = site, bn

    def float_weight(self, w: torch.Tensor) -> torch.Tensor:
        if self.bn is None:
            return w
        return w * self.bn.scale().reshape(-1, *([1] * (w.dim() - 1)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        folded = self.float_weight(w)
        return weight_fake_quant(self.site, folded.detach()).apply(folded)


class _FoldedBias(nn.Module):
    """Parametrization of a bias: b -> beta + (b - mu) * gamma / sigma."""

    def __init__(self, bn: _BNState):
        super().__init__()
        self.bn = bn

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return self.bn.beta + (b - self.bn.mean) * self.bn.scale()


class QAT(training.TrainingPass):
    """Quantization-aware training between calibrate and lower_quantized (STE, optional LSQ, BN folded)."""

    name = "qat"
    requires = (QuantPlan, QuantParams)
    uses = (FoldedBNs,)  # the BatchNorms fold_bn folded, trained folded when fold_bn_training

    def __init__(self, learn_scales: bool = False, fold_bn_training: bool = True, freeze_bn_steps: int = 0,
                 bn_momentum: float | None = 0.1, **loop: Any):
        self.set_loop(loop, lr=1e-3, weight_decay=0.0)
        if not isinstance(freeze_bn_steps, int) or isinstance(freeze_bn_steps, bool) or freeze_bn_steps < 0:
            raise RecipeError(f"qat: freeze_bn_steps must be an integer >= 0, got {freeze_bn_steps!r}.")
        if bn_momentum is not None and (not isinstance(bn_momentum, (int, float)) or not 0 < bn_momentum <= 1):
            raise RecipeError(f"qat: bn_momentum must be in (0, 1] or None (the average of all batches), "
                              f"got {bn_momentum!r}.")
        self.learn_scales, self.fold_bn_training = bool(learn_scales), bool(fold_bn_training)
        self.freeze_bn_steps, self.bn_momentum = freeze_bn_steps, bn_momentum

    def run(self, ctx: CompileContext) -> PassResult:
        gm, plan, params = ctx.gm, ctx.plans[QuantPlan], dict(ctx.plans[QuantParams].entries)
        if plan.mode != "static":
            raise PassError(f"[qat] trains static quantization; this plan is {plan.mode!r}.")
        holder = getattr(gm, HOLDER, None)
        if holder is None:
            raise PassError("[qat] the module has no observers: run insert_observers and calibrate before qat "
                            "(and lower_quantized after it).")
        loss_fn = training.loss_function(self.loss, self.name)
        observers = dict(holder.named_children())
        acts = {name: _ActFakeQuant(params[name], self.learn_scales) for name in observers if name in params}
        for name, module in acts.items():
            setattr(holder, name, module)
        notes: list[str] = []
        hooks: list = []
        layers = self._parametrize(gm, plan, ctx.plans.get(FoldedBNs, FoldedBNs({})).entries, notes, hooks)
        bns = [bn for _, _, bn in layers if bn is not None]
        frozen_at: dict[str, int] = {}

        def on_step(step: int, total: int) -> None:
            if step >= self.freeze_bn_steps and bns and not bns[0].frozen:
                for bn in bns:
                    bn.frozen = True
                frozen_at["step"] = step

        def step(model: nn.Module, inputs: tuple, target: Any) -> torch.Tensor:
            return loss_fn(model(*inputs), target)

        try:
            stats = training.fit(ctx, self.name, self.loop, step, on_step=on_step)
        finally:
            for handle in hooks:
                handle.remove()
            self._unparametrize(gm, layers)
            for name, obs in observers.items():
                setattr(holder, name, obs)
        changed = 0.0
        for name, module in acts.items():
            trained = module.trained()
            changed = max(changed, float(((trained.scale - params[name].scale).abs() / params[name].scale).max()))
            params[name] = trained
        ctx.plans[QuantParams] = QuantParams(params, ctx.plans[QuantParams].graph)
        stats |= {"activation_sites": len(acts), "weights": len(layers), "bn_folded_in_training": len(bns),
                  "bn_frozen_at": frozen_at.get("step")}
        if self.learn_scales:
            stats["scales_changed"] = round(changed, 4)
        # the folded weights are recomputed from the unfolded ones even when the starting weights are kept
        return PassResult(modified=stats["steps"] > 0, stats=stats, notes=tuple(notes))

    def _parametrize(self, gm: nn.Module, plan, folded: dict[str, FoldedBN], notes: list[str],
                     hooks: list) -> list[tuple[nn.Module, WeightSite, _BNState | None]]:
        layers, seen = [], set()
        for site in plan.weights.values():
            if site.weight in seen:
                continue
            seen.add(site.weight)
            owner_name, _, attr = site.weight.rpartition(".")
            owner = gm.get_submodule(owner_name)
            bn = self._bn_state(owner, owner_name, attr, site, folded.get(owner_name), notes)
            if bn is not None:
                rec = folded[owner_name]
                with torch.no_grad():
                    owner.weight.copy_(rec.weight)
                    owner.bias = nn.Parameter(rec.bias.clone() if rec.bias is not None
                                              else torch.zeros_like(rec.mean))
                parametrize.register_parametrization(owner, "bias", _FoldedBias(bn))
                hooks.append(owner.register_forward_hook(self._batch_norm_hook(bn)))
            parametrize.register_parametrization(owner, attr, _FoldedWeight(site, bn))
            layers.append((owner, site, bn))
        return layers

    def _bn_state(self, owner: nn.Module, owner_name: str, attr: str, site: WeightSite, rec: FoldedBN | None,
                  notes: list[str]) -> _BNState | None:
        if not self.fold_bn_training or rec is None or attr != "weight" \
                or not ops.of_module(owner, "weighted"):
            return None
        w, b = rec.folded()
        if owner.weight.shape != w.shape or not torch.allclose(owner.weight.detach(), w, rtol=1e-5, atol=1e-6) \
                or owner.bias is None or not torch.allclose(owner.bias.detach(), b, rtol=1e-5, atol=1e-6):
            notes.append(f"{owner_name}: weights changed since fold_bn; trained with BN already folded")
            return None
        return _BNState(rec, self.bn_momentum)

    @staticmethod
    def _batch_norm_hook(bn: _BNState):
        """Before the freeze, in training: undo the running-statistics fold of the output and normalise it with the
        batch's statistics instead (the fake-quantized weights stay the folded ones)."""
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not module.training or bn.frozen:
                return None
            linear = isinstance(module, nn.Linear)
            shape = (-1,) if linear else (-1, *([1] * (out.dim() - 2)))
            scale = bn.scale()
            tiny = torch.finfo(scale.dtype).tiny
            scale = torch.where(scale.abs() < tiny, torch.full_like(scale, tiny), scale)
            b = module.parametrizations.bias.original
            folded_bias = bn.beta + (b - bn.mean) * scale
            z = (out - folded_bias.reshape(shape)) / scale.reshape(shape) + b.reshape(shape)
            flat = z.reshape(-1, z.shape[-1]).t() if linear else z.transpose(0, 1).reshape(z.shape[1], -1)
            mean, var = flat.mean(1), flat.var(1, unbiased=False)
            bn.update(mean.detach(), var.detach(), flat.shape[1])
            return (z - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + bn.eps) * bn.gamma.reshape(shape) \
                + bn.beta.reshape(shape)
        return hook

    @staticmethod
    def _unparametrize(gm: nn.Module, layers: list[tuple[nn.Module, WeightSite, _BNState | None]]) -> None:
        """Back to plain float weights: the folded W * gamma / sigma and bias where BN was trained folded."""
        for owner, site, bn in layers:
            attr = site.weight.rpartition(".")[2]
            with torch.no_grad():
                param = getattr(owner.parametrizations, attr)
                weight = param[0].float_weight(param.original).detach().clone()
                bias = owner.bias.detach().clone() if bn is not None else None
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
            if bn is not None:
                parametrize.remove_parametrizations(owner, "bias", leave_parametrized=False)
                owner.bias = nn.Parameter(bias)
            setattr(owner, attr, nn.Parameter(weight))
