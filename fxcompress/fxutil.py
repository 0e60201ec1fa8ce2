"""Graph lookups and argument access shared by the core and the passes."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx


def lookup(gm: torch.nn.Module, target: str) -> Any:
    """The parameter, buffer, submodule or attribute at a dotted path (``layer1.0.conv1.weight``)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of a call node, given by position or as keyword ``name`` (``default`` when absent)."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)
