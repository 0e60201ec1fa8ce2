"""Graph lookups and argument access shared by the core and the passes."""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.fx

_TABLES = ("_parameters", "_buffers", "_modules")


@functools.lru_cache(maxsize=4096)
def _class_has(cls: type, name: str) -> bool:
    return hasattr(cls, name)


def lookup(gm: torch.nn.Module, target: str) -> Any:
    """The parameter, buffer, submodule or attribute at a dotted path (``layer1.0.conv1.weight``): ``getattr``
    step by step, reading a module's tables directly where ``getattr`` would reach them anyway (no class
    attribute or instance attribute of that name), which is several times faster on deep paths."""
    obj = gm
    for part in target.split("."):
        if isinstance(obj, torch.nn.Module) and part not in obj.__dict__ and not _class_has(type(obj), part):
            d = obj.__dict__
            for table in _TABLES:
                if part in d[table]:
                    obj = d[table][part]
                    break
            else:
                obj = getattr(obj, part)
            continue
        obj = getattr(obj, part)
    return obj


def arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of a call node, given by position or as keyword ``name`` (``default`` when absent)."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)
