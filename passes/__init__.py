"""The pass library: an explicit registry, one pass per module.

``PASSES`` maps a pass name (as in recipes and ``result.history``) to its class.  ``SHORTHANDS`` maps a recipe
shorthand to a function expanding its options into fine-grained pass objects.
"""
from __future__ import annotations

from typing import Any, Callable

from fxcompress.passes.low_rank.low_rank_svd import LowRankSVD
from fxcompress.passes.nas.nas import NAS
from fxcompress.passes.pruning.gradual_prune import GradualPrune
from fxcompress.passes.pruning.propagate_dependencies import PropagateDependencies
from fxcompress.passes.pruning.remove_channels import RemoveChannels
from fxcompress.passes.pruning.search_widths import SearchWidths
from fxcompress.passes.pruning.select_channels import SelectChannels
from fxcompress.passes.quant.binarize import Binarize
from fxcompress.passes.quant.calibrate import Calibrate
from fxcompress.passes.quant.fold_bn import FoldBatchNorm
from fxcompress.passes.quant.insert_observers import InsertObservers
from fxcompress.passes.quant.lower_quantized import LowerQuantized
from fxcompress.passes.quant.weight_share import WeightShare
from fxcompress.passes.train.distill import Distill
from fxcompress.passes.train.finetune import Finetune
from fxcompress.passes.train.qat import QAT
from fxcompress.passes.train.recalibrate_bn import RecalibrateBN

from fxcompress.errors import RecipeError
from fxcompress.options import check_value
from fxcompress.pass_base import Pass

PASSES: dict[str, type[Pass]] = {
    "fold_bn": FoldBatchNorm,
    "propagate_dependencies": PropagateDependencies,
    "select_channels": SelectChannels,
    "remove_channels": RemoveChannels,
    "search_widths": SearchWidths,
    "low_rank_svd": LowRankSVD,
    "insert_observers": InsertObservers,
    "calibrate": Calibrate,
    "lower_quantized": LowerQuantized,
    "recalibrate_bn": RecalibrateBN,
    "finetune": Finetune,
    "distill": Distill,
    "qat": QAT,
    "gradual_prune": GradualPrune,
    "nas": NAS,
    "weight_share": WeightShare,
    "binarize": Binarize,
}


def _split_options(shorthand: str, options: dict[str, Any], parts: list[type[Pass]]) -> list[Pass]:
    """Hand each option to the fine-grained pass that has it; an option none of them has is an error."""
    buckets: list[dict[str, Any]] = [{} for _ in parts]
    for key, value in options.items():
        owners = [i for i, cls in enumerate(parts) if key in cls.option_names()]
        if not owners:
            valid = sorted({o for cls in parts for o in cls.option_names()} | ({"fold_bn"} if shorthand == "quantize"
                                                                               else set()))
            raise RecipeError(f"recipe shorthand {shorthand!r} has no option {key!r}. "
                              f"Valid options: {', '.join(valid)}.")
        buckets[owners[0]][key] = value
    return [cls.from_options(b) for cls, b in zip(parts, buckets)]


def prune(options: dict[str, Any]) -> list[Pass]:
    """``prune`` = propagate_dependencies + select_channels + remove_channels."""
    return _split_options("prune", options, [PropagateDependencies, SelectChannels, RemoveChannels])


def auto_prune(options: dict[str, Any]) -> list[Pass]:
    """``auto_prune`` = propagate_dependencies + search_widths + select_channels + remove_channels.  The search
    decides every group's count, so ``ratio`` and ``scope`` are not options; ``criterion``, ``exclude``,
    ``min_channels`` and ``seed`` go to both the search and the selection, which must agree on them."""
    for key in ("ratio", "scope"):
        if key in options:
            raise RecipeError(f"recipe shorthand 'auto_prune' chooses each group's ratio under its budget, so it has "
                              f"no option {key!r}; give a budget, or use 'prune' for fixed ratios.")
    shared = {k: options[k] for k in ("criterion", "exclude", "min_channels", "seed") if k in options}
    passes = _split_options("auto_prune", options, [PropagateDependencies, SearchWidths, SelectChannels,
                                                    RemoveChannels])
    return [passes[0], passes[1], SelectChannels.from_options(shared), passes[3]]


def quantize(options: dict[str, Any]) -> list[Pass]:
    """``quantize`` = fold_bn + insert_observers + calibrate + lower_quantized (``fold_bn=false`` keeps BatchNorm)."""
    options = dict(options)
    fold = options.pop("fold_bn", True)
    check_value("quantize", "fold_bn", fold, bool)
    passes = _split_options("quantize", options, [InsertObservers, Calibrate, LowerQuantized])
    return [FoldBatchNorm(), *passes] if fold else passes


def low_rank(options: dict[str, Any]) -> list[Pass]:
    """``low_rank`` = low_rank_svd."""
    return _split_options("low_rank", options, [LowRankSVD])


SHORTHANDS: dict[str, Callable[[dict[str, Any]], list[Pass]]] = {
    "prune": prune,
    "auto_prune": auto_prune,
    "quantize": quantize,
    "low_rank": low_rank,
}
