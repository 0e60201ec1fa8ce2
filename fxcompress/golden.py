"""Golden models by name: ``names()``, ``load(name)``, the digits data ``digits(split, hard)`` (see the
``golden_models`` package), and ``load_model`` for a MODEL argument of the command line."""
from __future__ import annotations

from typing import Callable

import torch

from fxcompress.golden_models import GOLDEN, build
from fxcompress.golden_models.digits import digits as _digits

from .data import import_object
from .errors import InputError, unknown_name_message
from .golden_models.digits import SEED, harden, raw_split, standardize


def names() -> list[str]:

    return sorted(GOLDEN)


def load(name: str, batch_size: int = 1) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """``(model, example_inputs)`` of the golden model ``name``, deterministic and in eval mode."""

    if name not in GOLDEN:
        raise InputError(unknown_name_message("golden model", name, GOLDEN))
    return build(name, batch_size)


def digits(split: str, hard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of scikit-learn's digits shaped for the trained models; split in train, val, test."""

    return _digits(split, hard)


def load_model(spec: str, input_shape: str | None = None) -> tuple[torch.nn.Module, tuple]:
    """A golden model's name or ``package.module:factory`` (returning a module or ``(module, inputs)``)."""
    if ":" not in spec:
        return load(spec)

    factory = import_object(spec, "MODEL")
    if not callable(factory):
        raise InputError(f"{spec} is a {type(factory).__name__}; MODEL is a golden model name or "
                         f"package.module:factory, a function of no arguments returning a module or (module, inputs).")
    try:
        made = factory()
    except Exception as exc:  # noqa: BLE001 - the user's factory failed: say how, and what a factory is
        raise InputError(f"calling {spec}() failed: {type(exc).__name__}: {exc}. MODEL's factory is called with no "
                         f"arguments and returns a module or (module, example_inputs); write a small function that "
                         f"builds your model.") from exc
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


def calibration_batches(spec: str, samples: int = 128) -> list[tuple] | None:
    """Calibration data for the command line: the first ``samples`` training images (one per batch) of a trained
    digits model, else None."""

    golden = GOLDEN.get(spec)
    if golden is not None and golden.trained:
        images, _ = digits("train", golden.hard)
        return [(images[i:i + 1],) for i in range(min(samples, len(images)))]
    return None


def training_data(spec: str) -> DigitsTraining | None:
    """Training batches for the command line: the augmenting digits loader for a trained digits model, else None."""

    golden = GOLDEN.get(spec)
    return DigitsTraining(hard=golden.hard) if golden is not None and golden.trained else None


def accuracy(spec: str, split: str = "test", redraws: int = 0) -> Callable[[torch.nn.Module], float] | None:
    """``module -> accuracy (%)`` on a digits split for a trained digits model, else None.

    ``redraws`` (hard models only) adds that many fresh hardenings of the split's own images (seeds no split or
    training epoch uses): scores that must rank close models (a search's candidates) vary less than on the split's
    360 images alone, and still see no training image."""

    golden = GOLDEN.get(spec)
    if golden is None or not golden.trained:
        return None
    images, labels = digits(split, golden.hard)
    if redraws and golden.hard:
        raw, _ = raw_split(split)
        images = torch.cat([images, *(standardize(harden(raw, SEED + 1_000_003 * (r + 1))) for r in range(redraws))])
        labels = labels.repeat(redraws + 1)

    def score(module: torch.nn.Module) -> float:
        with torch.no_grad():
            return 100.0 * float((module(images).argmax(1) == labels).float().mean())

    return score


class DigitsTraining:
    """The digits training split as ``(images, labels)`` batches, re-iterable, for ``compile(train_data=...)``.

    ``hard=True`` with ``augment=True`` draws freshly hardened images (seeded rotation, shift, scale, noise) on every
    pass over the data, as the hard golden models were trained; the n-th iteration uses seed ``seed + n``, so a
    new instance replays the same sequence.  Otherwise the fixed split is served, in order.
    """

    def __init__(self, hard: bool = False, batch_size: int = 64, augment: bool = True, seed: int = 0):

        self.hard, self.batch_size, self.augment, self.seed = hard, batch_size, augment and hard, seed
        self.raw, self.labels = raw_split("train")
        self.fixed = digits("train", hard)[0]
        self.epoch = 0

    def __iter__(self):

        if self.augment:
            images = standardize(harden(self.raw, SEED + 7919 * (self.seed + self.epoch + 1)))
        else:
            images = self.fixed
        self.epoch += 1
        for i in range(0, len(self.labels), self.batch_size):
            yield images[i:i + self.batch_size], self.labels[i:i + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)
