"""The PassManager: an explicit ordered list of passes, run all, one at a time, ``until=``, ``start_after=``.

    pm = fxc.PassManager([{"pass": "fold_bn"}], dump_dir="dumps")
    ctx = pm.context(model, example_inputs)
    while pm.pending(ctx):
        record = pm.step(ctx)          # .name .seconds .modified .stats .diff .param_changes .error
        print(record.summary()); print(record.diff)

Around every pass run the instruments (see ``instruments``): code diff, honesty, verification with a numeric
check, numbered dumps.  When a pass fails, the module is restored to what the pass received and a reproducer
directory is written; the error names the pass and the directory.
"""
from __future__ import annotations

import collections.abc
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.fx

from . import meta
from . import recipe as recipes
from .context import CompileContext, PassRecord
from .errors import (
    FxCompressError,
    InputError,
    PassError,
    RecipeError,
    unknown_name_message,
)
from .instruments import (
    CodeDiff,
    Dump,
    Honesty,
    Instrument,
    Verify,
    strict,
    write_reproducer,
)
from .pass_base import Pass
from .snapshot import RestorePoint
from .tracing import TraceInfo, normalize_inputs, trace
from .tree import copy_tree

log = logging.getLogger(__name__)


def _check_data(example_inputs: Any, calibration_data: Iterable | None, train_data: Iterable | None,
                eval_fn: Callable | None) -> tuple:
    """The example inputs as a tuple of copies (the caller's stay untouched), after checking the data arguments."""
    if eval_fn is not None and not callable(eval_fn):
        raise InputError(f"eval_fn must be a callable taking the module and returning a float, "
                         f"got {type(eval_fn).__name__}.")
    for what, data in (("calibration_data", calibration_data), ("train_data", train_data)):
        if isinstance(data, collections.abc.Iterator):
            raise InputError(f"{what} is a {type(data).__name__}, which can be read only once; the passes read "
                             f"it several times (calibration, bias correction, every epoch). Pass a list "
                             f"(list(batches)) or a re-iterable loader such as a DataLoader.")
    return tuple(t.detach().clone() for t in normalize_inputs(example_inputs))


class PassManager:
    """Runs a recipe's passes over a CompileContext with instruments around each.

    ``verify`` (lint, metadata, pass ``verify``), ``check_numerics`` (EXACT/BOUNDED passes against the previous
    stage) and ``check_honesty`` are on by default; ``dump_dir`` turns on numbered code dumps; failures write a
    reproducer under ``reproducer_dir`` (a fresh temporary directory when None).
    """

    def __init__(
        self,
        recipe: Any,
        *,
        verify: bool = True,
        check_numerics: bool = True,
        check_honesty: bool = True,
        dump_dir: str | Path | None = None,
        reproducer_dir: str | Path | None = None,
        instruments: Iterable[Instrument] = (),
    ):
        self.passes: list[Pass] = recipes.build(recipe)
        forced = strict()
        self.dump = Dump(dump_dir) if dump_dir is not None else None
        self.instruments: list[Instrument] = [CodeDiff()]
        if check_honesty or forced:
            self.instruments.append(Honesty())
        if verify or forced:
            self.instruments.append(Verify(numerics=check_numerics or forced))
        if self.dump is not None:
            self.instruments.append(self.dump)
        self.instruments.extend(instruments)
        self.reproducer_dir = Path(reproducer_dir) if reproducer_dir is not None else None

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def context(self, model: torch.nn.Module, example_inputs: Any, calibration_data: Iterable | None = None,
                train_data: Iterable | None = None, eval_fn: Callable[[torch.nn.Module], float] | None = None,
                **trace_options: Any) -> CompileContext:
        """Trace (a copy of) ``model`` and wrap it in a fresh context positioned before the first pass."""
        inputs = _check_data(example_inputs, calibration_data, train_data, eval_fn)
        gm = trace(model, inputs, **trace_options)
        if self.dump is not None:
            self.dump.write_initial(gm)
        return CompileContext(gm=gm, example_inputs=inputs, calibration_data=calibration_data, train_data=train_data,
                              eval_fn=eval_fn, model=model)

    def resume(self, gm: torch.fx.GraphModule, example_inputs: Any, calibration_data: Iterable | None = None,
               train_data: Iterable | None = None, eval_fn: Callable[[torch.nn.Module], float] | None = None,
               plans: dict[str, Any] | None = None, model: torch.nn.Module | None = None) -> CompileContext:
        """A context over a module that is already a compiled GraphModule (a reproducer's ``module.pt``, the
        result of ``fxc.load``), without tracing it again: its node names, which plans refer to, stay as they are.
        ``plans`` are decisions earlier passes made for it; ``model`` is the original model (distill's default
        teacher).  ``gm`` itself is never modified (a copy is used)."""
        if not isinstance(gm, torch.fx.GraphModule):
            raise InputError(f"resume takes a compiled GraphModule, got {type(gm).__name__}; use context() to "
                             f"trace a model.")
        inputs = _check_data(example_inputs, calibration_data, train_data, eval_fn)
        gm = copy_tree(gm)
        try:
            meta.propagate(gm, tuple(t.clone() for t in inputs))
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"the module fails on the example inputs: {type(exc).__name__}: {exc}") from exc
        gm.meta.setdefault(meta.TRACE_INFO, TraceInfo(0.0, len(gm.graph.nodes), (), {}))
        if self.dump is not None:
            self.dump.write_initial(gm)
        return CompileContext(gm=gm, example_inputs=inputs, calibration_data=calibration_data, train_data=train_data,
                              eval_fn=eval_fn, model=model, plans=dict(plans or {}))

    def pending(self, ctx: CompileContext) -> list[str]:
        return self.names[ctx.cursor:]

    def _index(self, name: str, option: str) -> int:
        if name not in self.names:
            raise RecipeError(f"{option}={name!r}: " + unknown_name_message("pipeline pass", name, self.names))
        return self.names.index(name)

    def run(self, ctx: CompileContext, *, until: str | None = None, start_after: str | None = None,
            only: str | None = None) -> list[PassRecord]:
        """Run the pending passes; ``until`` stops after that pass, ``start_after`` skips up to and including it,
        ``only`` runs that single pass.  Returns the records of the passes run."""
        if only is not None:
            if until is not None or start_after is not None:
                raise RecipeError("only= runs one pass; do not combine it with until= or start_after=.")
            return [self._run_one(ctx, self._index(only, "only"))]
        if start_after is not None:
            ctx.cursor = self._index(start_after, "start_after") + 1
        stop = self._index(until, "until") + 1 if until is not None else len(self.passes)
        records = []
        while ctx.cursor < stop:
            records.append(self.step(ctx))
        return records

    def step(self, ctx: CompileContext) -> PassRecord:
        """Run the next pending pass and return its record."""
        if ctx.cursor >= len(self.passes):
            raise RecipeError(f"no pass left to run: the pipeline {self.names} has finished.")
        record = self._run_one(ctx, ctx.cursor)
        ctx.cursor += 1
        return record

    def _run_one(self, ctx: CompileContext, index: int) -> PassRecord:
        p = self.passes[index]
        ctx.forget_tensors()
        restore = ctx.restore_point = RestorePoint(ctx.gm, clone_tensors=p.writes_tensors, tensors=ctx.tensors())
        record = PassRecord(index=len(ctx.history), name=p.name, seconds=0.0, modified=False, stats={},
                            contract=p.contract.value, options=p.options())
        checks = 0.0
        try:
            t0 = time.perf_counter()
            for inst in self.instruments:  # value-neutral: a checked forward runs on buffer clones
                inst.before(ctx, p, index)
            t1 = time.perf_counter()
            ctx.require(p.name, p.requires)
            result = p.run(ctx)
            ctx.forget_tensors()
            written = restore.written()
            if written:
                raise PassError(f"[{p.name}] wrote {', '.join(written[:3])}{' ...' if len(written) > 3 else ''} in "
                                f"place but does not declare writes_tensors, so its restore point shares them.")
            for changed in restore.changed_graphs(ctx.gm):  # the code must follow the graph (checks read it)
                changed.recompile()
            t2 = time.perf_counter()
            record.seconds, record.modified = t2 - t1, result.modified
            record.stats, record.notes = dict(result.stats), tuple(result.notes)
            for inst in self.instruments:
                inst.after(ctx, p, result, record)
            checks = (t1 - t0) + (time.perf_counter() - t2)
        except Exception as exc:
            self._fail(ctx, index, restore, exc)
        finally:
            ctx.restore_point = None
        record.check_seconds = checks
        if record.modified:
            ctx.invalidate(keep=p.preserves)
            if not any(isinstance(i, Verify) for i in self.instruments):
                ctx.stage_outputs = None
        ctx.history.append(record)
        log.info(record.summary())
        return record

    def _fail(self, ctx: CompileContext, index: int, restore: RestorePoint, exc: Exception) -> None:
        """Restore the module pass ``index`` received, write a reproducer, and raise a PassError naming both."""
        p = self.passes[index]
        snapshot = ctx.gm = restore.restore()
        ctx.stage_outputs = None
        if isinstance(exc, (InputError, RecipeError)):  # the user's data or options: the message says what to fix
            raise exc
        base = self.reproducer_dir or Path(tempfile.mkdtemp(prefix="fxcompress-repro-"))
        analyses = [q for q in self.passes[:index] if set(q.produces) & set(ctx.analyses)]  # still valid
        where = write_reproducer(base / f"{len(ctx.history):02d}_{p.name}", ctx, snapshot, p, exc, analyses)
        if isinstance(exc, FxCompressError):
            raise type(exc)(f"{exc}\n  reproducer: {where}") from exc
        raise PassError(f"[{p.name}] failed with {type(exc).__name__}: {exc}\n  reproducer: {where}\n"
                        f"  The module is left as the pass received it.") from exc
