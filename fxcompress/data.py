"""The user's data from the command line: tensor files and ``module:function`` specs, checked and batched.

A SPEC is

- a ``.pt`` file (read with ``torch.load(weights_only=True)``): one tensor, a tuple/list of tensors (one per model
  input, or ``(inputs, targets)`` for training and evaluation), or a list of such batches;
- a ``.npy`` file (``numpy.load(allow_pickle=False)``): one array;
- ``package.module:function``: the function is called with no arguments and returns any of the above, or an
  iterable of batches (a DataLoader, say); for ``--eval-fn`` it is the evaluation function itself,
  ``function(module) -> float``, higher is better.

Tensors holding many samples are split along axis 0 into batches of ``batch_size``.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .errors import InputError


def import_object(spec: str, what: str) -> Any:
    """The object ``package.module:attr`` names; the current directory is importable, as for ``python -m``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"{what} {spec!r} is not of the form package.module:name.")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"{what}: cannot import module {module_name!r} ({exc}). Run from the directory that holds "
                         f"it, or make it importable (pip install -e . or PYTHONPATH).") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise InputError(f"{what}: module {module_name!r} has no attribute {attr!r}.") from None


def read(spec: str, what: str) -> Any:
    """The tensors (or the object) a SPEC names."""
    if ":" in spec and not Path(spec).exists():
        obj = import_object(spec, what)
        if not callable(obj):
            return obj
        try:
            return obj()
        except Exception as exc:  # noqa: BLE001 - the user's function failed: say which
            raise InputError(f"{what}: {spec}() failed: {type(exc).__name__}: {exc}") from exc
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"{what}: {spec!r} is neither a file nor package.module:function.")
    if path.suffix == ".npy":
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as exc:
            raise InputError(f"{what}: {spec!r} is not a plain .npy array ({exc}).") from exc
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise InputError(f"{what}: cannot read {spec!r} as tensors ({type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0]}). Save tensors with torch.save or numpy.save.") \
            from None


def _split(tensors: tuple[torch.Tensor, ...], batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    n = tensors[0].shape[0] if tensors[0].dim() else 1
    if any(t.dim() == 0 or t.shape[0] != n for t in tensors):
        raise InputError(f"the tensors have different numbers of samples along axis 0: "
                         f"{[tuple(t.shape) for t in tensors]}.")
    return [tuple(t[i:i + batch_size] for t in tensors) for i in range(0, n, batch_size)]


def _is_tensors(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(t, torch.Tensor) for t in value)


def input_batches(spec: str, example_inputs: tuple, batch_size: int, what: str) -> list[tuple]:
    """Batches of model inputs (for calibration) from a SPEC, each a tuple shaped like ``example_inputs``."""
    value = read(spec, what)
    n = len(example_inputs)
    if isinstance(value, torch.Tensor):
        if n != 1:
            raise InputError(f"{what}: {spec!r} holds one tensor; the model takes {n} inputs: save a tuple of {n}.")
        batches = _split((value,), batch_size)
    elif _is_tensors(value) and len(value) == n and all(t.dim() == e.dim() for t, e in zip(value, example_inputs)):
        batches = _split(tuple(value), batch_size)
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes, dict)):
        batches = [(b,) if isinstance(b, torch.Tensor) else tuple(b) for b in value]
    else:
        raise InputError(f"{what}: {spec!r} holds a {type(value).__name__}; expected a tensor, a tuple of tensors "
                         f"(one per input) or a list of batches.")
    return [tuple(_like(x, e) for x, e in zip(b, example_inputs)) for b in batches]


def _like(x: Any, example: torch.Tensor) -> Any:
    """A float64 array from numpy becomes the example's floating dtype (numpy defaults to float64)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and example.is_floating_point() \
            and x.dtype != example.dtype:
        return x.to(example.dtype)
    return x


def training_batches(spec: str, example_inputs: tuple, batch_size: int, what: str) -> list[tuple] | Iterable:
    """``(inputs, target)`` batches from a SPEC: a file of ``(inputs, targets)`` or an iterable of such pairs."""
    value = read(spec, what)
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], torch.Tensor) and (
            isinstance(value[0], torch.Tensor) or _is_tensors(value[0])):
        inputs = (value[0],) if isinstance(value[0], torch.Tensor) else tuple(value[0])
        if len(inputs) != len(example_inputs):
            raise InputError(f"{what}: {spec!r} holds {len(inputs)} input tensors; the model takes "
                             f"{len(example_inputs)}.")
        inputs = tuple(_like(x, e) for x, e in zip(inputs, example_inputs))
        split = _split((*inputs, value[1]), batch_size)
        return [((b[:-1][0] if len(b) == 2 else b[:-1]), b[-1]) for b in split]
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, dict, torch.Tensor)):
        return value
    raise InputError(f"{what}: {spec!r} holds a {type(value).__name__}; expected (inputs, targets) tensors or an "
                     f"iterable of (inputs, target) batches.")


def eval_function(spec: str, example_inputs: tuple, batch_size: int) -> Callable[[torch.nn.Module], float]:
    """``module -> score``: a ``module:function`` evaluation function, or top-1 accuracy (%) on the
    ``(inputs, labels)`` of a tensor file."""
    what = "--eval-fn"
    if ":" in spec and not Path(spec).exists():
        fn = import_object(spec, what)
        if not callable(fn):
            raise InputError(f"{what}: {spec} is a {type(fn).__name__}, not a function(module) -> float.")
        return fn
    batches = training_batches(spec, example_inputs, batch_size, what)

    def accuracy(module: torch.nn.Module) -> float:
        right = total = 0
        with torch.no_grad():
            for inputs, labels in batches:
                out = module(*((inputs,) if isinstance(inputs, torch.Tensor) else inputs))
                right += int((out.argmax(1) == labels).sum())
                total += int(labels.shape[0])
        return 100.0 * right / max(total, 1)

    return accuracy


class RandomCalibration:
    """Seeded N(0, 1) inputs shaped like the example inputs, for a model given without calibration data; the first
    time a pass reads them, ``warn`` says so (scales fitted to random data do not fit the model's real inputs)."""

    def __init__(self, example_inputs: tuple, samples: int, warn: Callable[[str], None]):
        self.example_inputs, self.samples, self.warn = example_inputs, samples, warn
        self.warned = False

    def __iter__(self):
        if not self.warned:
            self.warned = True
            self.warn(f"no calibration data given (--calibration-data): calibrating on {self.samples} random N(0, 1) "
                      f"inputs shaped like the example input; quantization scales and data-driven choices then fit "
                      f"random data, not yours.")
        g = torch.Generator().manual_seed(1234)
        for _ in range(self.samples):
            yield tuple(torch.randn((1, *t.shape[1:]), generator=g, dtype=t.dtype) if t.is_floating_point() else t
                        for t in self.example_inputs)

    def __len__(self) -> int:
        return self.samples
