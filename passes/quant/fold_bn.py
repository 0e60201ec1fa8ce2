"""Fold eval-mode BatchNorm into the preceding Conv/ConvTranspose/Linear.

    before:  y = bn(conv(x))          after:  y = conv'(x)
             W' = W * s,  b' = (b - mean) * s + beta,  s = gamma / sqrt(var + eps)   (per output channel)

Producers: the layers whose op record sets ``folds_bn`` (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` with any
groups, ``nn.Linear`` with a 2-D output, a weight-shared ``CodebookLayer``: the BatchNorm becomes its per-channel
scale).
BatchNorm: ``nn.BatchNorm1d/2d/3d`` modules or ``F.batch_norm`` with running statistics held by the module.
Requires: shape metadata.  Contract: EXACT (rtol=1e-5, atol=1e-5 x output scale).  Folding is done in float64.
Skips (counted in stats, each named in the notes):
  ``skipped_multi_user``            the producer's output is also used elsewhere (it would change there too),
  ``skipped_shared_module``         the producer module is called at several places (its weights are shared),
  ``skipped_training_bn``           BN in training mode normalises with batch statistics,
  ``skipped_no_running_stats``      BN without running statistics (``track_running_stats=False``),
  ``skipped_no_foldable_producer``  BN after anything else (an add, a functional conv, a pooling),
  ``skipped_channel_layout``        BN's channel axis is not the producer's output-feature axis.
"""
from __future__ import annotations

import collections
import dataclasses

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

from fxcompress import meta, ops
from fxcompress.context import CompileContext
from fxcompress.errors import VerificationError, user_frame_from_stack_trace
from fxcompress.lowbit import CodebookLayer
from fxcompress.pass_base import Contract, Pass, PassResult, refuse_quantized
from fxcompress.plans import Lifetime, Table, data_class

SKIP_REASONS = ("skipped_multi_user", "skipped_shared_module", "skipped_training_bn", "skipped_no_running_stats",
                "skipped_no_foldable_producer", "skipped_channel_layout")


@dataclasses.dataclass(frozen=True)
class _BN:
    """What folding needs of one BatchNorm call, whether a module or ``F.batch_norm``."""

    training: bool
    mean: torch.Tensor | None
    var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    where: str  # module name or node name, for notes


def _get_attr(gm: torch.fx.GraphModule, arg) -> torch.Tensor | None | bool:
    """The tensor behind a get_attr node, None for a None argument, False when it is computed (unfoldable)."""
    if arg is None:
        return None
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        obj = gm
        for part in arg.target.split("."):
            obj = getattr(obj, part)
        return obj
    return False


def _as_batchnorm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> _BN | None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, _BatchNorm) and not isinstance(m, _LazyNormBase):
            return _BN(m.training, m.running_mean, m.running_var, m.weight, m.bias, m.eps, node.target)
        return None
    if node.op == "call_function" and node.target is F.batch_norm:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        bound = dict(zip(names, node.args)) | dict(node.kwargs)
        tensors = [_get_attr(gm, bound.get(k)) for k in ("running_mean", "running_var", "weight", "bias")]
        if any(t is False for t in tensors):  # computed in the graph: no constant statistics to fold
            return _BN(bool(bound.get("training", False)), None, None, None, None, 0.0, node.name)
        return _BN(bool(bound.get("training", False)), *tensors, float(bound.get("eps", 1e-5)), node.name)
    return None


def _bn_input(node: torch.fx.Node):
    return node.args[0] if node.args else node.kwargs.get("input")


def _folded_values(w: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor, beta: torch.Tensor,
                   mean: torch.Tensor, var: torch.Tensor, eps: float,
                   transposed_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W' = W * s and b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps), in float64; a ConvTranspose weight
    (in, out/groups, *k) is scaled along its output channels (``transposed_groups`` = its groups)."""
    w, scale = w.double(), gamma.double() / torch.sqrt(var.double() + eps)
    bias = bias.double() if bias is not None else torch.zeros_like(scale)
    if transposed_groups is not None:
        g, spatial = transposed_groups, w.shape[2:]
        w = (w.reshape(g, w.shape[0] // g, w.shape[1], *spatial)
             * scale.reshape(g, 1, w.shape[1], *([1] * len(spatial)))).reshape(w.shape)
    else:  # weight: (out, in/groups, *k)
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    return w, (bias - mean.double()) * scale + beta.double()


def _fold(m: nn.Module, bn: _BN) -> None:
    """Rewrite ``m``'s weight and bias (new Parameters; the old tensors are not touched); a weight-shared layer
    takes the BatchNorm as a scale per output channel, its codebook staying shared."""
    out_channels = m.out_features if isinstance(m, nn.Linear) else m.out_channels
    ones = torch.ones(out_channels, dtype=torch.float64)
    gamma = bn.weight.detach() if bn.weight is not None else ones
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(ones)
    if isinstance(m, CodebookLayer):
        scale = gamma.double() / torch.sqrt(bn.var.detach().double() + bn.eps)
        bias = m.bias.detach().double() if m.bias is not None else torch.zeros_like(scale)
        m.fold(scale, (bias - bn.mean.detach().double()) * scale + beta.double())
        return
    transposed = m.groups if isinstance(m, nn.modules.conv._ConvTransposeNd) else None
    w, new_bias = _folded_values(m.weight.detach(), None if m.bias is None else m.bias.detach(), gamma, beta,
                                 bn.mean.detach(), bn.var.detach(), bn.eps, transposed)
    dtype = m.weight.dtype
    m.weight = nn.Parameter(w.to(dtype), requires_grad=m.weight.requires_grad)
    m.bias = nn.Parameter(new_bias.to(dtype), requires_grad=m.weight.requires_grad)


@data_class
@dataclasses.dataclass(frozen=True)
class FoldedBN:
    """A folded Conv/Linear + BatchNorm pair as it was before folding (copies), so that ``qat`` can train the BN
    folded into the weights (W * gamma / sigma) with statistics it keeps updating for a while."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    gamma: torch.Tensor
    beta: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    eps: float

    @classmethod
    def record(cls, m: nn.Module, bn: _BN) -> FoldedBN:
        channels = bn.mean.numel()
        copy = lambda t, fill: (t.detach().clone() if t is not None  # noqa: E731
                                else torch.full((channels,), fill, dtype=m.weight.dtype))
        return cls(m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone(),
                   copy(bn.weight, 1.0), copy(bn.bias, 0.0), bn.mean.detach().clone(), bn.var.detach().clone(),
                   bn.eps)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) as fold_bn computed them."""
        w, b = _folded_values(self.weight, self.bias, self.gamma, self.beta, self.mean, self.var, self.eps)
        return w.to(self.weight.dtype), b.to(self.weight.dtype)


@dataclasses.dataclass(frozen=True)
class FoldedBNs(Table):
    """{producer module name: FoldedBN}: the pairs fold_bn folded, as they were, made only when a later pass uses
    them (qat trains the BN folded into the weights)."""

    kind = "folded_bn"
    owner = "fold_bn"
    lifetime = Lifetime.ON_REQUEST


class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the preceding Conv/ConvTranspose/Linear."""

    name = "fold_bn"
    produces = (FoldedBNs,)
    contract = Contract.EXACT
    exact_tolerance = (1e-5, 1e-5)

    def __init__(self):
        pass

    def _skip_reason(self, gm: torch.fx.GraphModule, node: torch.fx.Node, bn: _BN, calls: collections.Counter) -> str | None:
        if bn.training:
            return "skipped_training_bn"
        if bn.mean is None or bn.var is None:
            return "skipped_no_running_stats"
        producer = _bn_input(node)
        if not (isinstance(producer, torch.fx.Node) and producer.op == "call_module"
                and ops.of_module(gm.get_submodule(producer.target), "folds_bn")):
            return "skipped_no_foldable_producer"
        if len(producer.users) > 1:
            return "skipped_multi_user"
        if calls[producer.target] > 1:
            return "skipped_shared_module"
        m = gm.get_submodule(producer.target)
        out = meta.tensor_info(producer)
        channels = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        if out is None or len(out.shape) < 2 or out.shape[1] != channels or bn.mean.numel() != channels:
            return "skipped_channel_layout"
        if (isinstance(m, nn.Linear) or isinstance(m, CodebookLayer) and m.kind == "linear") and len(out.shape) != 2:
            return "skipped_channel_layout"
        return None

    def verify(self, ctx: CompileContext) -> None:
        """No BatchNorm that could be folded is left: each one remaining has its skip reason."""
        gm = ctx.gm
        calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        for node in gm.graph.nodes:
            bn = _as_batchnorm(gm, node)
            if bn is not None and self._skip_reason(gm, node, bn, calls) is None:
                raise VerificationError(f"[{self.name}] left {bn.where} unfolded although it can be folded.")

    def run(self, ctx: CompileContext) -> PassResult:
        gm = ctx.gm
        if any(_as_batchnorm(gm, n) is not None for n in gm.graph.nodes):  # folding would change quantized weights
            refuse_quantized(gm, self.name, "Fold BatchNorm before quantizing (quantize folds it first unless "
                                            "fold_bn=false).")
        calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        stats = {"bn_seen": 0, "bn_folded": 0} | {k: 0 for k in SKIP_REASONS}
        notes = []
        record = FoldedBNs in ctx.requested  # copies of the unfolded weights only for a later pass that uses them
        folded = dict(ctx.plans.get(FoldedBNs, FoldedBNs({})).entries)
        for node in list(gm.graph.nodes):
            bn = _as_batchnorm(gm, node)
            if bn is None:
                continue
            stats["bn_seen"] += 1
            reason = self._skip_reason(gm, node, bn, calls)
            if reason is not None:
                stats[reason] += 1
                where = user_frame_from_stack_trace(node.stack_trace)
                notes.append(f"{bn.where}: {reason.removeprefix('skipped_').replace('_', ' ')}"
                             + (f" ({where})" if where else ""))
                continue
            producer = _bn_input(node)
            m = gm.get_submodule(producer.target)
            if record and not isinstance(m, (nn.modules.conv._ConvTransposeNd, CodebookLayer)):
                folded[producer.target] = FoldedBN.record(m, bn)
            _fold(m, bn)
            node.replace_all_uses_with(producer)
            gm.graph.erase_node(node)
            meta.add_provenance(producer, self.name, f"folded {bn.where}")
            stats["bn_folded"] += 1
        if record:
            ctx.plans[FoldedBNs] = FoldedBNs(folded)
        if stats["bn_folded"]:
            meta.eliminate_dead_code(gm.graph)
            gm.delete_all_unused_submodules()
        return PassResult(modified=stats["bn_folded"] > 0, stats=stats, notes=tuple(notes))
