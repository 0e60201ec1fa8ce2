"""Channel removal: apply a ``PruningPlan`` by rewriting layers to smaller ones (or by zeroing, in mask mode).

    before:  conv1 = Conv2d(64, 128)  bn1 = BatchNorm2d(128)  conv2 = Conv2d(128, 64)
    after:   conv1 = Conv2d(64, 64)   bn1 = BatchNorm2d(64)   conv2 = Conv2d(64, 64)      (mode="remove")
             same shapes, the 64 planned channels zeroed in every member                  (mode="mask")

``mode="remove"`` slices every member parameter and buffer, updates the modules' sizes (``in_channels``,
``num_features``, ``groups`` of depthwise convs, ...), replaces a pruned ``nn.MultiheadAttention`` by
``PrunedMultiheadAttention`` (softmax scale kept), and rewrites the graph where sizes are literal: reshape/view
arguments, slice bounds, split sizes (``chunk`` becomes ``split``), LayerNorm shapes, and shape reads of pruned
dims (frozen to the original value so that computed scales are unchanged).
``mode="mask"`` keeps every shape and zeroes the planned channels of every member (BatchNorm's running
variance is left alone).  On groups without channel-mixing normalisation both modes give the same outputs.
Requires: channel_groups, pruning_plan.  Contract: CHANGES.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.fx
import torch.nn as nn
from fxcompress.passes.pruning.lib.channel_deps import (
    PRUNE_ORDER,
    ChannelGraph,
    channel_masks,
)
from fxcompress.passes.pruning.lib.channel_rules import Space
from fxcompress.passes.pruning.lib.channel_spaces import index_items, slice_start
from fxcompress.passes.pruning.lib.width_space import PruningPlan

from fxcompress import meta, ops
from fxcompress.context import CompileContext
from fxcompress.errors import PassError, RecipeError, VerificationError
from fxcompress.fxutil import arg, lookup
from fxcompress.modules import PrunedMultiheadAttention, window_attention
from fxcompress.pass_base import Contract, Pass, PassResult, refuse_quantized
from fxcompress.plans import ChannelMasks
from fxcompress.tree import named_modules, named_tensors

MODES = ("remove", "mask")


def _owner(modules: dict[str, nn.Module], target: str) -> tuple[nn.Module, str]:
    """The module holding ``target`` (by ``modules``: name -> module, the root under "") and the attribute name."""
    path, _, attr = target.rpartition(".")
    return modules[path], attr


def _keep(size: int, removed: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[removed] = False
    return torch.nonzero(mask).flatten()




def _nonzero(t: torch.Tensor) -> bool:
    """Whether zeroing ``t`` changes its bytes: a value other than +0.0 (a masked -0.0 counts)."""
    return bool(t.any() or torch.signbit(t).any())


class RemoveChannels(Pass):
    """Channel removal: real smaller layers, or zeroed channels in mask mode."""

    name = "remove_channels"
    produces = (ChannelMasks,)
    contract = Contract.CHANGES
    requires = (ChannelGraph, PruningPlan)

    def __init__(self, mode: str = "remove"):
        if mode not in MODES:
            raise RecipeError(f"remove_channels: mode must be 'remove' or 'mask', got {mode!r}.")
        self.mode = mode

    @property
    def writes_tensors(self) -> bool:  # mask mode zeroes channels of the existing tensors
        return self.mode == "mask"

    @property
    def preserves(self) -> tuple:  # mask mode keeps the graph and every shape: the channel groups stay valid
        return (ChannelGraph,) if self.mode == "mask" else ()

    def verify(self, ctx: CompileContext) -> None:
        """Mask mode: every masked slice is zero.  Both modes: layer attributes agree with their tensors (checked by
        the manager for every pass)."""
        if self.mode != "mask":
            return
        for target, mask in ctx.plans.get(ChannelMasks, ChannelMasks({})).items():
            t = lookup(ctx.gm, target)
            if t.shape == mask.shape and bool((t.detach() * (1 - mask.to(t.dtype))).any()):
                raise VerificationError(f"[{self.name}] {target} is nonzero where its mask is zero.")

    def run(self, ctx: CompileContext) -> PassResult:
        refuse_quantized(ctx.gm, self.name, PRUNE_ORDER)
        cg: ChannelGraph = ctx.analyses[ChannelGraph]
        plan: PruningPlan = ctx.plans[PruningPlan]
        removed = torch.zeros(cg.n_units, dtype=torch.bool)
        for grp in cg.groups:
            idx = plan.removed.get(grp.name, ())
            if idx:
                if plan.sizes.get(grp.name) != grp.size:
                    raise PassError(f"[remove_channels] the plan for group {grp.name!r} was made for "
                                    f"{plan.sizes.get(grp.name)} channels, the graph has {grp.size}; "
                                    f"run select_channels again on this graph.")
                removed[grp.units[torch.tensor(idx, dtype=torch.long)]] = True
        if not bool(removed.any()):
            return PassResult(modified=False, stats={"mode": self.mode, "channels_removed": 0})
        positions = cg.removed_positions(cg.closure(removed))
        before = sum(p.numel() for p in ctx.gm.parameters())
        if self.mode == "mask":
            touched, masks = self._mask(cg, positions)
            previous = ctx.plans.get(ChannelMasks, ChannelMasks({})).entries
            ctx.plans[ChannelMasks] = ChannelMasks(
                {k: previous[k] * m if k in previous and previous[k].shape == m.shape else m for k, m in masks.items()}
                | {k: v for k, v in previous.items() if k not in masks})
        else:
            touched = self._remove(ctx, cg, positions)
        after = sum(p.numel() for p in ctx.gm.parameters())
        stats = {"mode": self.mode, "channels_removed": int(removed.sum()), "tensors_changed": touched,
                 "params_before": before, "params_after": after}
        return PassResult(modified=self.mode == "remove" or touched > 0, stats=stats)

    # -- mask --------------------------------------------------------------------------------------------------
    def _mask(self, cg: ChannelGraph, positions: dict[Space, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
        """Zero the planned channels; returns (tensors changed, {tensor target: 0/1 mask of its shape}), the masks
        that training passes re-apply so that the zeroed channels stay zero (a tensor whose planned channels are
        zero already is not counted)."""
        masks = channel_masks(cg, positions)
        touched = 0
        with torch.no_grad():
            for target, mask in masks.items():
                t = lookup(cg.gm, target)
                zero = mask.expand_as(t) == 0
                touched += _nonzero(t.masked_select(zero))
                t.masked_fill_(zero, 0)
        return touched, masks

    # -- remove ------------------------------------------------------------------------------------------------
    def _remove(self, ctx: CompileContext, cg: ChannelGraph, positions: dict[Space, torch.Tensor]) -> int:
        gm = cg.gm
        per_target: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for s, p in cg.rel.params.items():
            if s in positions:
                per_target.setdefault(p.target, []).append((p.dim, positions[s]))
        old_modules = {}
        aliases = _aliases(gm)
        modules = dict(named_modules(gm))
        done: dict[int, tuple] = {}  # id of a tensor -> its cuts: a tied tensor is cut once, the same way everywhere
        originals = {target: getattr(*_owner(modules, target)) for target in per_target}
        for target, cuts in per_target.items():
            owner, attr = _owner(modules, target)
            t = originals[target]
            key = tuple(sorted((d, tuple(p.tolist())) for d, p in cuts))
            names = aliases.get(id(t), [target])
            if id(t) in done:
                if done[id(t)] != key:
                    raise PassError(f"[remove_channels] {' and '.join(names)} are one tied tensor, and its uses "
                                    f"would lose different channels; exclude one of those modules from pruning.")
                continue
            done[id(t)] = key
            uncut = [n for n in names if n not in per_target]
            if uncut:
                raise PassError(f"[remove_channels] {target} is tied to {', '.join(uncut)}, whose uses keep every "
                                f"channel; pruning would untie them. Exclude {target.rpartition('.')[0] or target} "
                                f"from pruning.")
            new = t.detach()
            for dim, pos in cuts:
                new = new.index_select(dim, _keep(new.shape[dim], pos))
            new = _set(owner, attr, t, new.contiguous())
            for name in names:
                other_owner, other_attr = _owner(modules, name)
                old_modules.setdefault(name.rpartition(".")[0], _snapshot(other_owner))
                if other_owner is not owner or other_attr != attr:
                    _set(other_owner, other_attr, t, new, made=new)
        for s, g in cg.rel.grouped_inputs.items():
            if s in positions:
                m = modules[g.module]
                old_modules.setdefault(g.module, _snapshot(m))
                new = _grouped_input_select(m.weight.detach(), g.groups, positions[s], cg.sizes[s])
                _set(m, "weight", m.weight, new)
        for path, old in old_modules.items():
            m = modules[path]
            _resize(m, old)
        new_size = {s: cg.sizes[s] - (positions[s].numel() if s in positions else 0) for s in cg.sizes}
        _replace_attention(gm, cg, new_size, positions)
        _rewrite_graph(gm, cg, positions, new_size)
        meta.eliminate_dead_code(gm.graph)
        _update_meta(gm, new_size)
        return len(per_target)


def _update_meta(gm: torch.fx.GraphModule, new_size: dict[Space, int]) -> None:
    """Shapes after removal, from the plan: every pruned dim takes its new size (no forward pass needed)."""
    def resize(owner: str, info):
        if isinstance(info, meta.TensorInfo):
            shape = tuple(new_size.get((owner, d), n) for d, n in enumerate(info.shape))
            return info if shape == info.shape else meta.TensorInfo(shape, info.dtype)
        return info

    for node in gm.graph.nodes:
        info = node.meta.get(meta.TENSOR)
        if isinstance(info, meta.TensorInfo):
            node.meta[meta.TENSOR] = resize(node.name, info)
        elif type(info) in (tuple, list):
            node.meta[meta.TENSOR] = type(info)(resize(f"{node.name}.{i}", t) for i, t in enumerate(info))
        elif isinstance(info, meta.ValueInfo) and info.type_name == "Size" and (
                node.op == "call_function" or node.op == "call_method" and len(node.args) == 1 and not node.kwargs):
            src = node.args[0]
            if isinstance(src, torch.fx.Node) and isinstance(src.meta.get(meta.TENSOR), meta.TensorInfo):
                node.meta[meta.TENSOR] = meta.ValueInfo("Size", src.meta[meta.TENSOR].shape)


def _aliases(gm: nn.Module) -> dict[int, list[str]]:
    """Tensors held under several names (tied parameters): id -> every name."""
    names: dict[int, list[str]] = {}
    for name, t in named_tensors(gm):
        names.setdefault(id(t), []).append(name)
    return {k: v for k, v in names.items() if len(v) > 1}


def _set(owner: nn.Module, attr: str, old: torch.Tensor, new: torch.Tensor,
         made: torch.Tensor | None = None) -> torch.Tensor:
    """Put ``new`` (a Parameter like ``old`` when it was one) in place of ``old``; ``made``: the object already made
    for a tied tensor.  Returns the object set."""
    if made is None:
        made = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    if isinstance(made, nn.Parameter):
        if attr in owner._parameters:
            owner._parameters[attr] = made
        else:
            setattr(owner, attr, made)
    elif attr in owner._buffers:
        owner._buffers[attr] = made
    else:
        setattr(owner, attr, made)
    return made


def _snapshot(m: nn.Module) -> dict:
    state = m.__dict__  # plain attributes first: no Module.__getattr__ fallback for the absent ones
    return {k: state[k] if k in state else getattr(m, k)
            for k in ("in_channels", "out_channels", "groups", "in_features", "out_features")
            if k in state or hasattr(type(m), k)}


def _resize_conv(m: nn.Module, old: dict) -> None:
    w = m.weight
    depthwise = old["groups"] == old["in_channels"] and old["groups"] > 1
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        m.in_channels = w.shape[0]
        if depthwise:
            m.groups = m.in_channels
        m.out_channels = w.shape[1] * m.groups
    else:
        m.out_channels = w.shape[0]
        if depthwise:
            m.groups = m.out_channels // (old["out_channels"] // old["groups"])
            m.in_channels = m.groups
        else:
            m.in_channels = w.shape[1] * m.groups


def _resize_linear(m: nn.Module, old: dict) -> None:
    m.out_features, m.in_features = m.weight.shape


def _resize_norm(m: nn.Module, old: dict) -> None:
    ref = m.running_mean if m.running_mean is not None else m.weight
    if ref is not None:
        m.num_features = ref.shape[0]


def _resize_groupnorm(m: nn.Module, old: dict) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


def _resize_layernorm(m: nn.Module, old: dict) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _resize_embedding(m: nn.Module, old: dict) -> None:
    m.embedding_dim = m.weight.shape[1]


def _resize_prelu(m: nn.Module, old: dict) -> None:
    m.num_parameters = m.weight.shape[0]


RESIZE = {"conv": _resize_conv, "linear": _resize_linear, "norm": _resize_norm, "groupnorm": _resize_groupnorm,
          "layernorm": _resize_layernorm, "embedding": _resize_embedding, "prelu": _resize_prelu}
"""How a module's size attributes follow its sliced tensors, per ``resize`` kind of its record in
``fxcompress/ops.py``; a module without one keeps its attributes (``modules.inconsistent_attributes`` then names
any that disagree with the tensors after the pass)."""


def _resize(m: nn.Module, old: dict) -> None:
    """Bring a module's size attributes in line with its (sliced) parameters."""
    kind = ops.of_module(m, "resize")
    if kind is not None:
        RESIZE[kind](m, old)


def _grouped_input_select(w: torch.Tensor, groups: int, removed: torch.Tensor, cin: int) -> torch.Tensor:
    cout, cin_g = w.shape[0], w.shape[1]
    keep = torch.ones(cin, dtype=torch.bool)
    keep[removed] = False
    keep = keep.view(groups, cin_g)
    per = keep.sum(1)
    if bool((per != per[0]).any()):
        raise PassError("[remove_channels] a grouped conv would lose unequal numbers of input channels per group")
    blocks = w.reshape(groups, cout // groups, cin_g, *w.shape[2:])
    kept = [blocks[b][:, keep[b]] for b in range(groups)]
    return torch.stack(kept).reshape(cout, int(per[0]), *w.shape[2:]).contiguous()


def _replace_attention(gm: torch.fx.GraphModule, cg: ChannelGraph, new_size: dict, positions: dict) -> None:
    for node in gm.graph.nodes:
        if cg.rel.hooks.get(node.name) != "attention":
            continue
        m = gm.get_submodule(node.target)
        if not any(s[0].startswith(f"@{node.target}.") or s[0].startswith(f"~{node.target}.") for s in positions):
            continue
        heads = new_size[(f"~{node.target}.heads", 0)]
        head_dim = new_size[(f"~{node.target}.head_dim", 0)]
        new = PrunedMultiheadAttention.from_module(m, heads, head_dim) if isinstance(m, nn.MultiheadAttention) \
            else PrunedMultiheadAttention(m.in_proj_weight, m.in_proj_bias, m.out_proj, heads, head_dim, m.scale,
                                          m.batch_first, m.dropout)
        new.train(m.training)
        path, _, attr = node.target.rpartition(".")
        setattr(gm.get_submodule(path) if path else gm, attr, new)


def _rewrite_graph(gm: torch.fx.GraphModule, cg: ChannelGraph, positions: dict, new_size: dict) -> None:
    for node in list(gm.graph.nodes):
        kind = cg.rel.hooks.get(node.name)
        if kind is None:
            continue
        if kind == "reshape":
            shape = meta.tensor_info(node).shape
            dims = [new_size.get((node.name, d), shape[d]) for d in range(len(shape))]
            if dims != list(shape):
                args = list(node.args[1:])
                flat = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
                # A changed size computed as the model runs (MobileViT's B * C * H / p, which merges the batch)
                # becomes -1 where it is the only one and nothing else is inferred: the example's value would hold
                # for one batch size only.
                traced = [d for d, a in enumerate(flat) if isinstance(a, torch.fx.Node) and dims[d] != shape[d]]
                infer = traced[0] if len(traced) == 1 and -1 not in flat else None
                flat = [a if (isinstance(a, int) and a == -1) or dims[d] == shape[d] else -1 if d == infer else dims[d]
                        for d, a in enumerate(flat)]
                node.args = (node.args[0], *flat) if node.op == "call_method" else (node.args[0], tuple(flat))
        elif kind == "unflatten":
            shape = meta.tensor_info(node).shape
            dim = node.args[1] % len(meta.tensor_info(node.args[0]).shape)
            k = len(node.args[2])
            sizes = tuple(new_size.get((node.name, dim + j), shape[dim + j]) for j in range(k))
            if node.op == "call_module":
                gm.get_submodule(node.target).unflattened_size = sizes
            else:
                node.args = (node.args[0], node.args[1], sizes)
        elif kind == "split":
            _rewrite_split(node, cg, new_size)
        elif kind == "slice":
            _rewrite_slice(node, cg, positions, new_size)
        elif kind == "narrow":
            x, dim, start = node.args[0], node.args[1], node.args[2]
            dim %= len(meta.tensor_info(x).shape)
            pos = positions.get((x.name, dim))
            start = start % cg.sizes[(x.name, dim)]
            new_start = start - (int((pos < start).sum()) if pos is not None else 0)
            node.args = (x, dim, new_start, new_size[(node.name, dim)])
        elif kind == "size":
            _freeze_size(gm, node, positions)
        elif kind == "layernorm":
            _rewrite_layernorm(gm, node, new_size)
        elif kind == "functional_depthwise":
            x = node.args[0]
            c = 1 if len(meta.tensor_info(x).shape) == len(meta.tensor_info(arg(node, 1, "weight")).shape) else 0
            groups = new_size[(x.name, c)]
            if len(node.args) > 6:
                node.args = (*node.args[:6], groups, *node.args[7:])
            else:
                node.kwargs = {**node.kwargs, "groups": groups}
        elif kind == "window_attention":
            _rewrite_window_attention(gm, node)
        elif kind == "sdpa":
            q = node.args[0] if node.args else node.kwargs["query"]
            d = len(meta.tensor_info(q).shape) - 1
            if (q.name, d) in positions and node.kwargs.get("scale") is None:
                node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(cg.sizes[(q.name, d)])}


def _rewrite_window_attention(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """torchvision's window attention derives its per-head width and query scale from the input's width: call the
    equivalent that reads the widths from the (now narrower) weights and keeps the original scale."""
    if node.target is window_attention:
        return
    bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    kwargs = dict(a)
    if a["logit_scale"] is None:  # V1: q * (C // num_heads) ** -0.5, C the input's original width
        kwargs["head_scale"] = (meta.tensor_info(a["input"]).shape[-1] // a["num_heads"]) ** -0.5
    node.target, node.args, node.kwargs = window_attention, (), kwargs


def _rewrite_split(node: torch.fx.Node, cg: ChannelGraph, new_size: dict) -> None:
    x = node.args[0]
    outs = node.meta[meta.TENSOR]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim %= len(meta.tensor_info(x).shape)
    sizes = [new_size[(f"{node.name}.{i}", dim)] for i in range(len(outs))]
    if sizes == [o.shape[dim] for o in outs]:
        return
    if node.op == "call_method":
        node.target = "split"
        node.args = (x, sizes, dim)
    else:
        node.target = torch.split
        node.args = (x, sizes, dim)
    node.kwargs = {}


def _rewrite_slice(node: torch.fx.Node, cg: ChannelGraph, positions: dict, new_size: dict) -> None:
    src, index = node.args
    shape = meta.tensor_info(src).shape
    items = index_items(index, len(shape))
    d_in = d_out = 0
    for j, item in enumerate(items):
        if item is None:
            d_out += 1
            continue
        if isinstance(item, slice):
            pos = positions.get((src.name, d_in))
            if pos is not None:
                start = slice_start(item, shape[d_in])
                new_start = start - int((pos < start).sum())
                items[j] = slice(new_start, new_start + new_size[(node.name, d_out)])
            d_out += 1
        d_in += 1
    node.args = (src, tuple(items) if isinstance(index, tuple) or len(items) > 1 else items[0])


def _freeze_size(gm: torch.fx.GraphModule, node: torch.fx.Node, positions: dict) -> None:
    """``x.size(d)`` / ``x.shape[d]`` of a pruned dim: the original value, so computed scales stay the same."""
    x = node.args[0]
    info = meta.tensor_info(x)
    if node.op == "call_method":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        reads = [(node, dim)] if dim is not None else []
    else:
        # x.shape[d]; a call that takes the whole shape (``math.prod(x.shape)``) reads the pruned shape as it runs
        reads = [(u, u.args[1]) for u in node.users
                 if u.op == "call_function" and len(u.args) > 1 and isinstance(u.args[1], int)]
    for user, dim in reads:
        dim %= len(info.shape)
        if (x.name, dim) in positions:
            _replace_with_constant(gm, user, info.shape[dim])


def _replace_with_constant(gm: torch.fx.GraphModule, node: torch.fx.Node, value: int) -> None:
    for user in list(node.users):
        user.args = torch.fx.node.map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
    gm.graph.erase_node(node)


def _rewrite_layernorm(gm: torch.fx.GraphModule, node: torch.fx.Node, new_size: dict) -> None:
    shape = meta.tensor_info(node).shape
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        k = len(m.normalized_shape)
        m.normalized_shape = tuple(new_size.get((node.name, len(shape) - k + j), shape[len(shape) - k + j])
                                   for j in range(k))
    else:
        ns = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
        k = len(ns)
        new = [new_size.get((node.name, len(shape) - k + j), shape[len(shape) - k + j]) for j in range(k)]
        if len(node.args) > 1:
            node.args = (node.args[0], new, *node.args[2:])
        else:
            node.kwargs = {**node.kwargs, "normalized_shape": new}
