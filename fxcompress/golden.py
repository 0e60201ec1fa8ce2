"""Golden models by name: ``names()`` and ``load(name)`` (see the ``golden_models`` package)."""
from __future__ import annotations

import torch

from .errors import InputError, unknown_name_message


def names() -> list[str]:
    from fxcompress.golden_models import GOLDEN

    return sorted(GOLDEN)


def load(name: str, batch_size: int = 1) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """``(model, example_inputs)`` of the golden model ``name``, deterministic and in eval mode."""
    from fxcompress.golden_models import GOLDEN, build

    if name not in GOLDEN:
        raise InputError(unknown_name_message("golden model", name, GOLDEN))
    return build(name, batch_size)
