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
import contextlib
import copy
import gc
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.fx

from . import meta
from . import recipe as recipes
from .context import CompileContext, PassRecord, RunState
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
from .plans import Artifact, Store
from .snapshot import RestorePoint
from .tracing import TraceInfo, normalize_inputs, trace
from .tree import copy_tree, named_tensors

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


@contextlib.contextmanager
def _heap_frozen():
    """The objects alive now (the model, its graph: hundreds of thousands on a deep model) moved out of the garbage
    collector's view while a pass runs, so that its collections scan only what the pass allocates; a full
    collection over a 500-block model's graph costs about as much as one pass.  Nothing is frozen when the
    process already froze objects of its own (their freeze is not ours to undo)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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
                plans: Iterable[Artifact] | Store | None = None, **trace_options: Any) -> CompileContext:
        """Trace (a copy of) ``model`` and wrap it in a fresh context positioned before the first pass.  ``plans``
        (``fxc.load_plans``, an earlier ``result.plans``) are applied by their planners instead of deciding again."""
        inputs = _check_data(example_inputs, calibration_data, train_data, eval_fn)
        given = self._given(plans)
        by_name = dict(zip(example_inputs, inputs)) if isinstance(example_inputs, dict) else inputs
        with _heap_frozen():
            gm = trace(model, by_name, share_tensors=True, **trace_options)
        if self.dump is not None:
            self.dump.write_initial(gm)
        return CompileContext(gm=gm, example_inputs=inputs, calibration_data=calibration_data, train_data=train_data,
                              eval_fn=eval_fn, model=model, given=given,
                              borrowed=frozenset(id(t) for _, t in named_tensors(model)))

    def _given(self, plans: Iterable[Artifact] | Store | None) -> Store:
        """The plans given for replay, each of a type some pass of the pipeline makes."""
        given = Store(plans)
        made = {kind for p in self.passes for kind in p.produces}
        for kind in given:
            if kind not in made:
                raise InputError(f"plans: a {kind.kind} was given, but no pass of the pipeline {self.names} makes "
                                 f"one (its owner is {kind.owner}); give only the plans of passes in the recipe.")
        return given

    def resume(self, gm: torch.fx.GraphModule, example_inputs: Any, calibration_data: Iterable | None = None,
               train_data: Iterable | None = None, eval_fn: Callable[[torch.nn.Module], float] | None = None,
               plans: Iterable[Artifact] | Store | None = None, model: torch.nn.Module | None = None) -> CompileContext:
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
                              eval_fn=eval_fn, model=model, plans=Store(plans))

    def pending(self, ctx: CompileContext) -> list[str]:
        return self.names[ctx.run.cursor:]

    def _index(self, name: str, option: str) -> int:
        if name not in self.names:
            raise RecipeError(f"{option}={name!r}: " + unknown_name_message("pipeline pass", name, self.names))
        return self.names.index(name)

    def run(self, ctx: CompileContext, *, until: str | None = None, start_after: str | None = None,
            only: str | None = None) -> list[PassRecord]:
        """Run the pending passes; ``until`` stops after that pass, ``start_after`` skips up to and including it,
        ``only`` runs that single pass.  Returns the records of the passes run."""
        try:
            if only is not None:
                if until is not None or start_after is not None:
                    raise RecipeError("only= runs one pass; do not combine it with until= or start_after=.")
                return [self._run_one(ctx, self._index(only, "only"))]
            if start_after is not None:
                ctx.run.cursor = self._index(start_after, "start_after") + 1
            stop = self._index(until, "until") + 1 if until is not None else len(self.passes)
            records = []
            while ctx.run.cursor < stop:
                records.append(self._step(ctx))
            return records
        finally:
            ctx.own_tensors()  # the module handed back never shares the model's tensors

    def step(self, ctx: CompileContext) -> PassRecord:
        """Run the next pending pass and return its record."""
        try:
            return self._step(ctx)
        finally:
            ctx.own_tensors()

    def _step(self, ctx: CompileContext) -> PassRecord:
        if ctx.run.cursor >= len(self.passes):
            raise RecipeError(f"no pass left to run: the pipeline {self.names} has finished.")
        record = self._run_one(ctx, ctx.run.cursor)
        ctx.run.cursor += 1
        return record

    def run_inner(self, ctx: CompileContext, passes: list[Pass]) -> list[PassRecord]:
        """Run ``passes`` from inside the pass now running (gradual pruning's selections while it trains), each
        with the instruments around it, as a pipeline pass is: checked, restored and reproduced on failure.  Their
        records go to the running pass's record (``record.inner``), not to the history.  They decide afresh (plans
        given to compile are for the pipeline's passes) and see the module as it is now (the numeric check compares
        against it, not against the module the outer pass received), in eval mode (a training pass's dropout would
        make every check random); the modules' training flags are restored after."""
        outer, instruments = ctx.run, self.instruments
        modes = [(m, m.training) for m in ctx.gm.modules()]
        ctx.gm.eval()
        ctx.run = RunState(cursor=outer.cursor, index=outer.index)
        self.instruments = [copy.copy(i) for i in instruments]  # the outer pass's instrument state stays as it is
        given, requested, ctx.given = ctx.given, ctx.requested, Store()
        records = []
        try:
            for p in passes:
                records.append(self._run_one(ctx, outer.index, p))
        finally:
            ctx.run, self.instruments, ctx.given, ctx.requested = outer, instruments, given, requested
            ctx.forget_tensors()
            for m, training in modes:
                m.training = training
        outer.inner.extend(records)
        return records

    def _run_one(self, ctx: CompileContext, index: int, inner: Pass | None = None) -> PassRecord:
        """Run pipeline pass ``index`` (or ``inner`` from inside it) with the instruments around it."""
        p = inner or self.passes[index]
        if p.writes_tensors:
            ctx.own_tensors()  # copy on write: the model's tensors are copied before the first pass that writes
        ctx.forget_tensors()
        if inner is None:
            ctx.requested = frozenset(kind for q in self.passes[index + 1:] for kind in (*q.requires, *q.uses))
        ctx.run.index, ctx.run.manager, ctx.run.inner = index, self, []
        record = PassRecord(index=len(ctx.history), name=p.name, seconds=0.0, modified=False, stats={},
                            contract=p.contract.value, options=p.options())
        with _heap_frozen():
            restore = ctx.run.restore_point = RestorePoint(ctx.gm, clone_tensors=p.writes_tensors,
                                                           tensors=ctx.tensors())
            try:
                self._checked_run(ctx, p, index, restore, record)
            except Exception as exc:
                self._fail(ctx, index, p, restore, exc)
            finally:
                ctx.run.restore_point = None
        if record.modified:
            ctx.invalidate(keep=p.preserves)
            if not any(isinstance(i, Verify) for i in self.instruments):
                ctx.run.stage_outputs = None
        if inner is None:
            ctx.history.append(record)
        log.info(record.summary())
        return record

    def _checked_run(self, ctx: CompileContext, p: Pass, index: int, restore: RestorePoint,
                     record: PassRecord) -> None:
        """``p.run`` between the instruments; fills ``record``."""
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
        record.inner = tuple(ctx.run.inner)
        for inst in self.instruments:
            inst.after(ctx, p, result, record)
        record.check_seconds = (t1 - t0) + (time.perf_counter() - t2)

    def _fail(self, ctx: CompileContext, index: int, p: Pass, restore: RestorePoint, exc: Exception) -> None:
        """Restore the module ``p`` (pipeline pass ``index`` or a pass run inside it) received, write a reproducer,
        and raise a PassError naming both."""
        snapshot = ctx.gm = restore.restore()
        ctx.run.stage_outputs = None
        if isinstance(exc, (InputError, RecipeError)):  # the user's data or options: the message says what to fix
            raise exc
        base = self.reproducer_dir or Path(tempfile.mkdtemp(prefix="fxcompress-repro-"))
        analyses = [q for q in self.passes[:index] if set(q.produces) & set(ctx.analyses)]  # still valid
        where = write_reproducer(base / f"{len(ctx.history):02d}_{p.name}", ctx, snapshot, p, exc, analyses)
        if isinstance(exc, FxCompressError):
            raise type(exc)(f"{exc}\n  reproducer: {where}") from exc
        raise PassError(f"[{p.name}] failed with {type(exc).__name__}: {exc}\n  reproducer: {where}\n"
                        f"  The module is left as the pass received it.") from exc
