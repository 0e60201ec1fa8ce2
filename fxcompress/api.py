"""``fxc.compile``: trace, run a recipe through the PassManager, and return a ``CompileResult``."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.fx

from . import counting, meta, persist
from .context import PassRecord
from .counting import Totals
from .export.onnx import export_onnx as _export_onnx
from .pass_manager import PassManager
from .plans import Artifact, Store
from .report import compile_report
from .tracing import TraceInfo


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

    def report(self) -> str:
        leaves = ", ".join(f"{k} ({v})" for k, v in self.trace.auto_leaves.items()) or "none"
        line = f"traced {self.trace.nodes} nodes in {self.trace.seconds:.2f} s; submodules kept opaque: {leaves}"
        return compile_report(type(self.module).__name__, self.before, self.after, self.history, line)

    def save(self, path: str | Path) -> Path:
        """Write the compiled module to ``path`` (its state_dict, which carries the architecture as plain data);
        ``fxc.load(path)`` rebuilds it without running pickled code.  Returns the Path."""
        return persist.save(self.module, path)

    def export_onnx(self, path: str | Path, **options: Any) -> Path:
        """Write the compiled module as ONNX (QDQ where quantized), checked with onnx.checker; returns the Path."""
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
    ctx = pm.context(model, example_inputs, calibration_data, train_data=train_data, eval_fn=eval_fn,
                     plans=plans, leaf_modules=leaf_modules,
                     concrete_args=concrete_args, eval_mode=True)
    before = counting.totals(ctx.gm)
    pm.run(ctx)
    gm = ctx.gm.eval()
    return CompileResult(module=gm, history=ctx.history, example_inputs=ctx.example_inputs, before=before,
                         after=counting.totals(gm), trace=gm.meta[meta.TRACE_INFO], plans=ctx.plans)
