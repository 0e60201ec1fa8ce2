"""Golden models by name: ``names()``, ``load(name)``, the digits data ``digits(split, hard)`` (see the
``golden_models`` package), and ``load_model`` for a MODEL argument of the command line."""
from __future__ import annotations

import importlib

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


def digits(split: str, hard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of scikit-learn's digits shaped for the trained models; split in train, val, test."""
    from fxcompress.golden_models.digits import digits as _digits

    return _digits(split, hard)


def load_model(spec: str, input_shape: str | None = None) -> tuple[torch.nn.Module, tuple]:
    """A golden model's name or ``package.module:factory`` (returning a module or ``(module, inputs)``)."""
    if ":" not in spec:
        return load(spec)
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot load {spec!r}: {exc}. MODEL is a golden model name ({', '.join(names())}) "
                         f"or package.module:factory.") from exc
    made = factory()
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        return made
    if not isinstance(made, torch.nn.Module):
        raise InputError(f"{spec} returned {type(made).__name__}; a factory returns a module or (module, inputs).")
    if input_shape is None:
        raise InputError(f"{spec} returns a bare module; give the example input shape, e.g. --input-shape 1,3,224,224.")
    try:
        shape = tuple(int(d) for d in input_shape.split(","))
    except ValueError as exc:
        raise InputError(f"--input-shape must be comma-separated integers, got {input_shape!r}.") from exc
    return made.eval(), (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)


def calibration_batches(spec: str, example_inputs: tuple, samples: int = 128) -> list[tuple]:
    """Calibration data for the command line: the first ``samples`` training images (one per batch) of a trained
    digits model, else seeded random inputs shaped like the example inputs."""
    from fxcompress.golden_models import GOLDEN

    golden = GOLDEN.get(spec)
    if golden is not None and golden.trained:
        images, _ = digits("train", golden.hard)
        return [(images[i:i + 1],) for i in range(min(samples, len(images)))]
    g = torch.Generator().manual_seed(1234)
    return [tuple(torch.randn((1, *t.shape[1:]), generator=g) if t.is_floating_point() else t
                  for t in example_inputs) for _ in range(samples)]
