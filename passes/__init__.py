"""The pass library: an explicit registry, one pass per module.

``PASSES`` maps a pass name (as in recipes and ``result.history``) to its class.  ``SHORTHANDS`` maps a recipe
shorthand to a function expanding its options into fine-grained pass objects.
"""
from __future__ import annotations

from typing import Any, Callable

from fxcompress.pass_base import Pass

from .fold_bn import FoldBatchNorm

PASSES: dict[str, type[Pass]] = {
    "fold_bn": FoldBatchNorm,
}

SHORTHANDS: dict[str, Callable[[dict[str, Any]], list[Pass]]] = {}
