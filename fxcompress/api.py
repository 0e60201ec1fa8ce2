"""``fxc.compile``: trace, run a recipe through the PassManager, and return a ``CompileResult``."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.fx

from . import counting, meta, persist, pieces
from .context import PassRecord
from .counting import Totals
from .errors import ExportError, TopLevelUntraceable, TracingError
from .export.onnx import export_onnx as _export_onnx
from .pass_manager import PassManager
from .plans import Artifact, Store
from .report import compile_report
from .tracing import TraceInfo, wrap_root
from .tree import copy_tree


@dataclasses.dataclass
class CompileResult:
    """The compiled module (eval mode, same call signature and output structure), what each pass did, and totals."""

    module: torch.fx.GraphModule
    history: list[PassRecord]
    example_inputs: tuple
    before: Totals
    after: Totals
    trace: TraceInfo
    plans: Store = dataclasses.field(default_factory=Store)  # plans by type (or kind name); prints summaries
    pieces: dict[str, CompileResult] = dataclasses.field(default_factory=dict)  # when compiled piece by piece

    def report(self) -> str:
        leaves = ", ".join(f"{k} ({v})" for k, v in self.trace.auto_leaves.items()) or "none"
        line = f"traced {self.trace.nodes} nodes in {self.trace.seconds:.2f} s; submodules kept opaque: {leaves}"
        if self.trace.shape_branches:  # the graph asserts them: inputs of other shapes fail loudly
            line += "; branches on input shapes taken as the example inputs take them: " + \
                ", ".join(dict.fromkeys(self.trace.shape_branches))
        return compile_report(type(self.module).__name__, self.before, self.after, self.history, line)

    def save(self, path: str | Path) -> Path:
        """Write the compiled module to ``path`` (its state_dict, which carries the architecture as plain data);
        ``fxc.load(path)`` rebuilds it without running pickled code.  Returns the Path."""
        return persist.save(self.module, path)

    def export_onnx(self, path: str | Path, **options: Any) -> Path:
        """Write the compiled module as ONNX (QDQ where quantized), checked with onnx.checker; returns the Path."""
        if self.pieces:
            raise ExportError(f"{type(self.module).__name__} was compiled piece by piece: its own forward "
                              f"({', '.join(self.trace.auto_leaves)} and the code around them) is Python, not a "
                              f"graph. Export the pieces: result.pieces[name].export_onnx(path) for name in "
                              f"{', '.join(self.pieces)}.")
        return _export_onnx(self.module, self.example_inputs, path, **options)


def compile(
    model: torch.nn.Module,
    example_inputs: Any,
    recipe: Any,
    calibration_data: Iterable | None = None,
    *,
    train_data: Iterable | None = None,
    eval_fn: Callable[[torch.nn.Module], float] | None = None,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    dump_dir: str | Path | None = None,
    verify: bool = True,
    check_numerics: bool = True,
    plans: Iterable[Artifact] | Store | None = None,
) -> CompileResult:
    """Compile a copy of ``model`` (in eval mode) through ``recipe``; ``model`` itself is never modified.  ``plans``
    (``fxc.load_plans(path)``, an earlier ``result.plans``) are applied instead of decided again: each planner of the
    recipe whose plan is given checks that it was made for the graph it sees and applies it."""
    pm = PassManager(recipe, verify=verify, check_numerics=check_numerics, dump_dir=dump_dir)
    try:
        ctx = pm.context(model, example_inputs, calibration_data, train_data=train_data, eval_fn=eval_fn,
                         plans=plans, leaf_modules=leaf_modules,
                         concrete_args=concrete_args, eval_mode=True)
    except TopLevelUntraceable as exc:
        given = [k for k, v in (("train_data", train_data), ("eval_fn", eval_fn), ("plans", plans),
                                ("dump_dir", dump_dir), ("leaf_modules", leaf_modules or None),
                                ("concrete_args", concrete_args)) if v is not None]
        if given or isinstance(example_inputs, dict):
            raise TracingError(f"{exc}\n  compiling its pieces instead takes example_inputs by position and no "
                               f"{', '.join(given) or 'inputs by name'}.") from exc
        return _compile_pieces(model, example_inputs, recipe, calibration_data, exc,
                               dict(verify=verify, check_numerics=check_numerics))
    before = counting.totals(ctx.gm)
    pm.run(ctx)
    gm = ctx.gm.eval()
    return CompileResult(module=gm, history=ctx.history, example_inputs=ctx.example_inputs, before=before,
                         after=counting.totals(gm), trace=gm.meta[meta.TRACE_INFO], plans=ctx.plans)


def _compile_pieces(model: torch.nn.Module, example_inputs: Any, recipe: Any, calibration_data: Iterable | None,
                    failure: TopLevelUntraceable, options: dict[str, Any]) -> CompileResult:
    """``compile`` of a model whose own forward no front end captures: its largest traceable submodules are
    compiled with the recipe, each on what it receives, inside a copy of the model (``fxcompress/pieces.py``)."""
    start = time.perf_counter()
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    root = copy_tree(model).eval()
    runs = pieces.record_calls(root, [inputs, *pieces.calibration_runs(calibration_data)])

    def one(name: str, module: torch.nn.Module, args: tuple, calibration: list[tuple]) -> CompileResult:
        result = compile(module, args, recipe, calibration or None, **options)
        if result.pieces:  # its own forward is not captured either: open it up here, one level of pieces
            raise TracingError(f"{type(module).__name__}.forward is not captured: {result.trace.fx_failure}")
        return result
    compiled, left = pieces.compile_pieces(root, runs, one, (TracingError,))
    reason = str(failure).splitlines()[0]
    if not compiled:
        why = "; ".join(f"{k}: {v}" for k, v in list(left.items())[:6])
        raise TracingError(f"{reason}\n  no submodule of it compiles on its own either: {why}") from failure
    for name, result in compiled.items():
        pieces.install(root, name, result.module)
    gm = wrap_root(root, len(inputs), type(model).__name__)
    info = TraceInfo(time.perf_counter() - start, sum(r.trace.nodes for r in compiled.values()), (), left,
                     front_end="pieces", fx_failure=reason)
    gm.meta[meta.TRACE_INFO] = info
    history = [dataclasses.replace(h, piece=name) for name, r in compiled.items() for h in r.history]
    return CompileResult(module=gm, history=history, example_inputs=inputs,
                         before=counting.add(r.before for r in compiled.values()),
                         after=counting.add(r.after for r in compiled.values()), trace=info, pieces=compiled)
