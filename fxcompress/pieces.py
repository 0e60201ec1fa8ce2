"""Partial compilation: the pieces of a model whose top-level forward cannot be captured.

A detection model's forward takes a list of images, resizes them one by one, and ends in data-dependent
post-processing (anchors per image size, non-maximum suppression); neither symbolic tracing nor torch.export can
capture it, while its backbone, neck and heads, where the compute is, are plain tensor programs.  ``fxc.compile``
then compiles the model piece by piece:

1. the model runs once on the example inputs (and once per calibration batch) with a forward hook on every
   submodule, recording what each one receives (``record_calls``);
2. from the root down, a submodule called exactly once, with tensors only, is a candidate piece; the recipe is
   compiled on it with its recorded inputs (and its recorded calibration inputs).  A candidate that does not
   trace, or a submodule that is not a candidate, is opened up: its children are tried in turn
   (``why_not_piece``, ``compile_pieces``);
3. each compiled piece replaces its submodule in a copy of the model (``install``), whose own forward stays
   Python: the compiled module is a GraphModule calling that copy.  What no piece covers runs as the model wrote
   it, and the largest submodules left so are named with the reason (``result.trace.auto_leaves``).

A piece's outputs are its model's: they keep their width, so pruning is confined to each piece's inside, and an
exact pass stays exact for the whole model.  ``result.pieces`` holds each piece's own ``CompileResult`` (its
history, totals and ONNX export); the whole model does not export, its Python parts being no graph.
"""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .errors import InputError

R = TypeVar("R")
Calls = dict[str, list[tuple]]  # qualified name -> the positional arguments of each call, in call order


def record_calls(model: nn.Module, runs: Iterable[tuple]) -> list[Calls]:
    """For each run (a tuple of positional inputs), what every submodule of ``model`` received; keyword arguments
    are recorded as a trailing dict (so that such a call is no candidate).  Tensors are cloned: the model may
    modify what it passes on."""
    names = {m: n for n, m in model.named_modules() if n}
    current: Calls = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        recorded = pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, args)
        current.setdefault(names[module], []).append(recorded + ((kwargs,) if kwargs else ()))
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in names]
    recorded: list[Calls] = []
    try:
        with torch.no_grad():
            for inputs in runs:
                current = {}
                model(*inputs)
                recorded.append(current)
    finally:
        for h in handles:
            h.remove()
    return recorded


def why_not_piece(name: str, calls: list[tuple]) -> str | None:
    """Why the submodule called with ``calls`` cannot be compiled as one piece (None when it can be tried)."""
    if len(calls) != 1:
        return f"called {len(calls)} times in one forward (a piece is compiled for one call)"
    args = calls[0]
    if not args:
        return "called without tensor arguments"
    for a in args:
        if not isinstance(a, torch.Tensor):
            kind = "keyword arguments" if isinstance(a, dict) else f"a {type(a).__name__} argument"
            return f"called with {kind} (a piece takes tensors)"
    if not any(a.is_floating_point() for a in args):
        return "called with no floating-point tensor"
    return None


def calibration_runs(calibration_data: Iterable | None) -> list[tuple]:
    """The calibration batches as positional input tuples (the forms ``compile`` accepts)."""
    if calibration_data is None:
        return []
    runs = []
    for batch in calibration_data:
        if isinstance(batch, dict):
            raise InputError("calibration_data for a model compiled piece by piece gives positional inputs, like "
                             "its example_inputs; a dict was given.")
        runs.append(tuple(batch) if isinstance(batch, (tuple, list)) else (batch,))
    return runs


def _empty(args: tuple) -> bool:
    """A call on an empty batch (a RoI head when an image has no proposals): nothing to calibrate from."""
    return any(isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 0 for a in args)


def install(root: nn.Module, name: str, piece: nn.Module) -> None:
    """Put ``piece`` where the submodule ``name`` of ``root`` was."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, piece)


def compile_pieces(root: nn.Module, runs: list[Calls], compile_one: Callable[[str, nn.Module, tuple, list[tuple]], R],
                   errors: tuple[type[BaseException], ...]) -> tuple[dict[str, R], dict[str, str]]:
    """Compile the largest pieces of ``root`` (``runs[0]``: the example run, the rest calibration runs) with
    ``compile_one(name, submodule, example args, calibration args)``; an exception of ``errors`` opens the
    submodule up.  Returns the compiled pieces by name and, for each largest submodule under which nothing
    compiled, why it was not a piece."""
    compiled: dict[str, R] = {}
    left: dict[str, str] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = prefix + child_name
            calls = runs[0].get(name)
            if not calls:  # a container (ModuleList) or not called on the example inputs
                visit(child, name + ".")
                continue
            why = why_not_piece(name, calls)
            if why is None:
                try:
                    calibration = [r[name][0] for r in runs[1:] if r.get(name) and not _empty(r[name][0])]
                    compiled[name] = compile_one(name, child, calls[0], calibration)
                    continue
                except errors as exc:
                    lines = str(exc).strip().splitlines()
                    why = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
            before = len(compiled)
            visit(child, name + ".")
            if len(compiled) == before:  # nothing under it compiled: name it alone, not its parts
                for inner in [k for k in left if k.startswith(name + ".")]:
                    del left[inner]
                left[name] = why
    visit(root, "")
    return compiled, left
