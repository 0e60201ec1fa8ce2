"""The op registry: one record per module class, function and tensor method, holding what the passes know of it.

A record names a behaviour per concern; the library of that concern implements each name once:

=============  ==========================================================  ==============================================
field          what it says                                                 implemented by
=============  ==========================================================  ==============================================
``channels``   how the op relates the channels of its inputs, outputs and   ``passes/pruning/lib/channel_rules.py`` KINDS
               parameters (pruning)
``resize``     how a module's size attributes follow its sliced tensors     ``passes/pruning/remove_channels.py`` RESIZE
``quant``      its role in quantization placement                           ``passes/quant/lib/quant_plan.py`` ROLES
``macs``       how its multiply-accumulates are counted                     ``fxcompress/counting.py`` MAC_RULES
``weighted``   a layer whose weight holds output channels first (masks)     gradual_prune, qat
``folds_bn``   a following BatchNorm folds into it                          ``passes/quant/fold_bn.py``
``factorizes`` low-rank SVD can split it into two thinner layers            ``passes/low_rank/low_rank_svd.py``
``activation`` an activation whose outputs the data criteria read           ``passes/pruning/select_channels.py``
=============  ==========================================================  ==============================================

Adding an op whose behaviours exist already is one ``register`` call here; an op that needs a new behaviour adds
its implementation in the one library of that concern.  An op without a record, or a field left ``None``, is not
guessed at: pruning treats it as a barrier, quantization leaves it float, counting gives it no MACs.

Modules are looked up along their class's MRO, field by field (a subclass of ``nn.Conv2d`` inherits every field
it does not set), unless the caller asks for the exact class (quantization lowers only the classes it knows,
since a subclass may change ``forward``).  Methods are keyed by the ``torch.Tensor`` attribute (``Tensor.relu``).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import operator
import sys
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError
from .lowbit import CodebookLayer, LowBitLayer
from .modules import (
    PrunedMultiheadAttention,
    dynamic_quant_linear,
    quantized_embedding,
    requantized_conv,
    window_attention,
)


@dataclasses.dataclass(frozen=True)
class Op:
    """What the passes know of one op; ``None``: nothing (the op is left alone by that concern)."""

    channels: str | None = None
    resize: str | None = None
    quant: str | None = None
    macs: str | None = None
    weighted: bool | None = None
    folds_bn: bool | None = None
    factorizes: bool | None = None
    activation: bool | None = None


FIELDS = tuple(f.name for f in dataclasses.fields(Op))
OPS: dict[Any, Op] = {}


def register(*targets: Any, **fields: Any) -> None:
    """Add ``fields`` to the records of ``targets`` (module classes, functions, ``torch.Tensor`` methods); a field
    that a record already sets to another value is an error, so two registrations cannot silently disagree."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise InputError(f"op fields {sorted(unknown)} are unknown; the fields are {list(FIELDS)}")
    for target in targets:
        old = OPS.get(target, Op())
        clash = {k: (getattr(old, k), v) for k, v in fields.items() if getattr(old, k) not in (None, v)}
        if clash:
            raise InputError(f"op {_name(target)}: {clash} (already registered with another value)")
        OPS[target] = dataclasses.replace(old, **fields)
    _of_class_cached.cache_clear()


_PENDING: list[tuple[str, tuple[str, ...], dict[str, Any]]] = []  # (library, "module.attr" paths, fields)
_LIBRARY_TARGETS: dict[str, Any] = {}  # fx's qualified name -> a library function the registry names (fxc.load)


def register_library(library: str, *paths: str, **fields: Any) -> None:
    """``register`` for functions and classes of an optional library (torchvision, timm), done once the library has
    been imported by whoever uses it: a model calling them has imported it, and the registry never imports it."""
    _PENDING.append((library, paths, fields))
    _resolve_pending()


def _resolve_pending() -> None:
    for entry in [e for e in _PENDING if e[0] in sys.modules]:
        _PENDING.remove(entry)
        library, paths, fields = entry
        targets = []
        for path in paths:
            module, _, attr = path.rpartition(".")
            target = getattr(importlib.import_module(module), attr, None)
            if target is None:
                raise InputError(f"op registry: {library} has no {path} (a version this registry does not know)")
            targets.append(target)
            if not isinstance(target, type):
                _LIBRARY_TARGETS[torch.fx.node._get_qualified_name(target)] = target
        register(*targets, **fields)


def library_function(name: str) -> Any:
    """The function of an optional library that the registry names, by fx's qualified name (what a saved graph
    calls), importing that library; None for any other name."""
    library = name.partition(".")[0]
    if any(entry[0] == library for entry in _PENDING) and library not in sys.modules:
        try:
            importlib.import_module(library)
        except ImportError:
            return None
    _resolve_pending()
    return _LIBRARY_TARGETS.get(name)


def _name(target: Any) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)


def _of_class(cls: type, field: str) -> Any:
    if _PENDING:
        _resolve_pending()
    return _of_class_cached(cls, field)


@functools.lru_cache(maxsize=None)
def _of_class_cached(cls: type, field: str) -> Any:
    for base in cls.__mro__:
        op = OPS.get(base)
        if op is not None and getattr(op, field) is not None:
            return getattr(op, field)
    return None


def of_module(module: nn.Module, field: str, exact: bool = False) -> Any:
    """``field`` of a module's record: its class's, else the nearest base class's that sets it (``exact``: only its
    own class's)."""
    if exact:
        op = OPS.get(type(module))
        return getattr(op, field) if op is not None else None
    return _of_class(type(module), field)


def of_target(target: Any, field: str) -> Any:
    """``field`` of a function's or ``torch.Tensor`` method's record (None when it has none)."""
    if _PENDING:
        _resolve_pending()
    try:
        op = OPS.get(target)
    except TypeError:  # an unhashable target
        return None
    return getattr(op, field) if op is not None else None


def of_node(gm: torch.fx.GraphModule, node: torch.fx.Node, field: str, modules: dict[str, nn.Module] | None = None,
            exact: bool = False) -> Any:
    """``field`` of the op a call node runs (``modules``: the module tree by name, if the caller has it)."""
    if node.op == "call_module":
        module = modules[node.target] if modules is not None else gm.get_submodule(node.target)
        return of_module(module, field, exact)
    if node.op == "call_method":
        return of_target(getattr(torch.Tensor, node.target, None), field)
    if node.op == "call_function":
        return of_target(node.target, field)
    return None


def targets_with(field: str, value: Any = True) -> list[Any]:
    """Every registered target whose own record sets ``field`` to ``value``."""
    if _PENDING:
        _resolve_pending()
    return [t for t, op in OPS.items() if getattr(op, field) == value]


T = torch.Tensor


def _methods(*names: str) -> list[Any]:
    return [getattr(T, n) for n in names]


# ---- layers with weights ----------------------------------------------------------------------------------------
register(nn.Conv1d, nn.Conv2d, nn.Conv3d, channels="conv", resize="conv", quant="conv", macs="conv_layer",
         weighted=True, folds_bn=True, factorizes=True)
register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, channels="conv", resize="conv",
         quant="conv_transpose", macs="conv_layer", weighted=True, folds_bn=True, factorizes=False)
register(nn.Linear, channels="linear", resize="linear", quant="linear", macs="linear_layer", weighted=True,
         folds_bn=True, factorizes=True)
register(nn.modules.linear.NonDynamicallyQuantizableLinear, quant="linear")  # the rest from nn.Linear
register(F.conv1d, F.conv2d, F.conv3d, channels="functional_conv", quant="conv_function", macs="conv")
register(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, channels="functional_conv",
         macs="conv_transpose")
register(F.linear, channels="functional_linear", quant="linear_function", macs="matmul")
register(nn.Embedding, channels="embedding", resize="embedding", quant="embedding")
register(nn.PReLU, channels="prelu", resize="prelu")
register(nn.MultiheadAttention, channels="multihead_attention", macs="attention_layer")
register(PrunedMultiheadAttention, channels="multihead_attention")
register(CodebookLayer, macs="codebook_layer", folds_bn=True)  # few-bit weights: barriers to channel rules
register(LowBitLayer, macs="codebook_layer")
register(nn.LSTM, nn.GRU, nn.RNN, channels="recurrent")
register(requantized_conv, macs="conv")  # the quantized simulation's convolutions and Linear layers
register(dynamic_quant_linear, macs="matmul")
register(quantized_embedding)

# ---- matrix products and attention ------------------------------------------------------------------------------
register(operator.matmul, torch.matmul, torch.bmm, *_methods("matmul", "bmm"), channels="matmul", quant="matmul",
         macs="matmul")
register(torch.mm, T.mm, quant="matmul", macs="matmul")
register(T.__matmul__, quant="matmul")
register(torch.addmm, T.addmm, channels="addmm", quant="addmm", macs="addmm")
register(torch.baddbmm, T.baddbmm, macs="baddbmm")
register(F.scaled_dot_product_attention, channels="sdpa", macs="sdpa")
register(torch.einsum, torch.functional.einsum, channels="einsum", macs="einsum")

# ---- normalisation ----------------------------------------------------------------------------------------------
register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
         nn.InstanceNorm3d, channels="batchnorm", resize="norm")
register(F.batch_norm, channels="functional_batchnorm")
register(nn.LayerNorm, channels="layernorm", resize="layernorm")
register(F.layer_norm, channels="functional_layernorm")
register(nn.RMSNorm, channels="layernorm", resize="layernorm")  # LayerNorm's structure: weight, no bias
register(F.rms_norm, channels="functional_layernorm")
register(nn.GroupNorm, channels="groupnorm", resize="groupnorm")
register(F.group_norm, channels="functional_groupnorm")
register(F.normalize, channels="lp_normalize")
register(torch.norm, torch.linalg.vector_norm, T.norm, channels="p_norm")

# ---- elementwise ------------------------------------------------------------------------------------------------
register(nn.ReLU, nn.ReLU6, F.relu, F.relu6, torch.relu, T.relu, channels="unary", quant="relu", activation=True)
register(nn.Hardtanh, channels="unary", quant="hardtanh")  # a ReLU when its lower bound is >= 0
register(nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, F.gelu, F.silu, F.hardswish, F.leaky_relu,
         F.elu, F.mish, torch.relu_, T.relu_, channels="unary", activation=True)
register(nn.SELU, nn.CELU, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Softplus, nn.AlphaDropout, F.hardsigmoid,
         F.hardtanh, F.selu, F.softplus, F.sigmoid, F.tanh, torch.sigmoid, torch.tanh, torch.exp, torch.abs,
         torch.neg, torch.clamp, operator.neg, torch.square, torch.sqrt, torch.rsqrt, torch.erf,
         *_methods("sigmoid", "tanh", "exp", "abs", "neg", "clamp", "clamp_", "float", "half", "double", "to",
                   "type_as", "clone", "detach", "sqrt", "rsqrt", "square", "pow", "sigmoid_"),
         channels="unary")
register(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity, F.dropout, T.contiguous,
         channels="unary", quant="pass")
register(operator.add, operator.iadd, torch.add, T.add, T.add_, channels="broadcast", quant="add")
register(T.__add__, T.__iadd__, quant="add")
register(operator.sub, operator.mul, operator.truediv, operator.imul, torch.sub, torch.mul, torch.div,
         torch.maximum, torch.minimum, torch.where, operator.pow, torch.pow,
         *_methods("sub", "mul", "div", "sub_", "mul_", "div_", "masked_fill", "where"), channels="broadcast")
register(nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, T.softmax, T.log_softmax,
         channels="softmax_like")
register(F.glu, channels="glu")
# stochastic depth / drop path: the identity in eval, a per-sample (or per-batch) scale in training
register_library("torchvision", "torchvision.ops.stochastic_depth", "torchvision.ops.StochasticDepth",
                 channels="unary", quant="pass")
register_library("timm", "timm.layers.drop_path", "timm.layers.DropPath", channels="unary", quant="pass")
register_library("torchvision", "torchvision.models.swin_transformer.shifted_window_attention",
                 channels="window_attention", macs="window_attention")
register(window_attention, channels="window_attention", macs="window_attention")  # what pruned Swin blocks call
register_library("torchvision", "torchvision.models.swin_transformer._patch_merging_pad", channels="patch_merging")
register_library("torchvision", "torchvision.models.swin_transformer._get_relative_position_bias",
                 channels="not_channels")

# ---- pooling, resampling, padding -------------------------------------------------------------------------------
register(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, channels="leading",
         quant="pass")
register(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
         nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, F.avg_pool1d, F.avg_pool2d,
         F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
         F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample, channels="leading")
register(F.pad, channels="pad")

# ---- shapes, layout, selection ----------------------------------------------------------------------------------
register(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, nn.Flatten, nn.Unflatten,
         *_methods("flatten", "view", "reshape", "unflatten", "squeeze", "unsqueeze"), channels="reshape",
         quant="pass")
register(torch.permute, torch.transpose, T.permute, T.transpose, T.t, channels="permute", quant="pass")
register(torch.t, torch.swapaxes, T.swapaxes, channels="permute")
register(nn.PixelShuffle, nn.PixelUnshuffle, F.pixel_shuffle, F.pixel_unshuffle, channels="pixel_shuffle",
         quant="pass")
register(nn.ChannelShuffle, torch.channel_shuffle, quant="pass")
register(T.expand, channels="expand", quant="pass")
register(T.expand_as, channels="expand")
register(T.repeat, channels="repeat", quant="pass")
register(torch.roll, T.roll, channels="roll")
register(torch.cat, torch.concat, channels="cat", quant="cat")
register(torch.concatenate, quant="cat")
register(torch.stack, channels="stack")
register(torch.split, torch.chunk, torch.unbind, torch.split_with_sizes,
         *_methods("split", "chunk", "unbind", "split_with_sizes"), channels="split",
         quant="split")
register(torch.tensor_split, T.tensor_split, quant="split")
register(operator.getitem, channels="getitem")
register(torch.narrow, T.narrow, channels="narrow")
register(torch.select, T.select, channels="select", quant="pass")
register(T.reshape_as, T.view_as, channels="reshape_as", quant="pass")
register(T.size, T.dim, getattr, channels="no_tensor")
register(torch.mean, torch.sum, torch.amax, torch.amin, torch.var, torch.std,
         *_methods("mean", "sum", "amax", "amin", "std", "var"),
         channels="reduce")
