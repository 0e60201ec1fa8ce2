"""Instruments the PassManager runs around every pass.

- ``CodeDiff``: unified diff of ``gm.code`` and parameter-shape changes, on every record.
- ``Honesty``: fingerprints graph, modules and parameter values; fails a pass whose ``modified`` flag is false
  while something changed (or true while nothing did).
- ``Verify``: ``graph.lint()``, metadata present and equal to a fresh run on the example inputs, the pass's own
  ``verify``, and for EXACT/BOUNDED passes a numeric check of the outputs against the previous stage.
- ``Dump``: numbered ``NN_pass.py`` / ``NN_pass.diff`` files, written only when the graph changed.
- ``write_reproducer``: a directory holding the module before the failing pass, the inputs and a script.

``strict_checks()`` forces Honesty and Verify on for everything run inside it (the test suite does this).
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import difflib
import hashlib
import itertools
import json
import math
import traceback
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.fx
from torch.utils import _pytree as pytree

from . import meta
from .context import CompileContext, PassRecord
from .errors import VerificationError
from .modules import inconsistent_attributes
from .pass_base import Contract, Pass, PassResult
from .plans import encode
from .plans import save as save_plans
from .tree import named_modules, named_tensors

_STRICT = contextvars.ContextVar("fxcompress_strict_checks", default=False)


@contextlib.contextmanager
def strict_checks() -> Iterator[None]:
    """Within this block every PassManager verifies, checks numerics and checks honesty, whatever it was told."""
    token = _STRICT.set(True)
    try:
        yield
    finally:
        _STRICT.reset(token)


def strict() -> bool:
    return _STRICT.get()


class Instrument:
    """Hooks around one pass.  State lives on the instance (one per manager), never on the class."""

    def before(self, ctx: CompileContext, p: Pass, index: int) -> None:
        pass

    def after(self, ctx: CompileContext, p: Pass, result: PassResult, record: PassRecord) -> None:
        pass


def _shapes(tensors: list[tuple[str, torch.Tensor]]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors}


class CodeDiff(Instrument):
    def before(self, ctx, p, index):
        self.code, self.shapes = ctx.gm.code, _shapes(ctx.tensors())

    def after(self, ctx, p, result, record):
        code = ctx.gm.code
        if code != self.code:
            record.diff = "".join(difflib.unified_diff(
                self.code.splitlines(keepends=True), code.splitlines(keepends=True),
                fromfile=f"before {p.name}", tofile=f"after {p.name}"))
        shapes = _shapes(ctx.tensors())
        changes = [f"-{k} {list(v)}" for k, v in self.shapes.items() if k not in shapes]
        changes += [f"+{k} {list(v)}" for k, v in shapes.items() if k not in self.shapes]
        changes += [f"{k}: {list(self.shapes[k])} -> {list(v)}" for k, v in shapes.items()
                    if k in self.shapes and self.shapes[k] != v]
        record.param_changes = tuple(changes)


def fingerprint(gm: torch.fx.GraphModule, tensors: list[tuple[str, torch.Tensor]] | None = None) -> str:
    """A digest of the code, the module tree and every parameter and buffer value (``tensors``: the module's
    ``tree.named_tensors`` if the caller has them)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(gm.code.encode())
    h.update("".join(f"{name}:{type(mod).__qualname__}:{mod.training};" for name, mod in named_modules(gm)).encode())
    tensors = named_tensors(gm) if tensors is None else tensors
    h.update("".join(f"{name}:{tuple(t.shape)}:{t.dtype};" for name, t in tensors).encode())
    for _, t in tensors:
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return h.hexdigest()


class Honesty(Instrument):
    """Whether the module changed, from the manager's restore point where it can tell (shared tensors, which the
    manager already checked were not written) and by fingerprints of every value otherwise."""

    def before(self, ctx, p, index):
        point = ctx.run.restore_point
        self.digest = fingerprint(ctx.gm, ctx.tensors()) if point is None or point.cloned else None

    def after(self, ctx, p, result, record):
        point = ctx.run.restore_point
        if self.digest is None and point is not None:
            changed = not point.unchanged(ctx.gm)
        else:
            changed = fingerprint(ctx.gm, ctx.tensors()) != self.digest
        if changed and not result.modified:
            raise VerificationError(
                f"[{p.name}] returned modified=False but changed the module"
                f"{' (code diff below)' if record.diff else ' (parameter/buffer values or submodules)'}. "
                f"A pass must report every change.\n{record.diff}")
        if result.modified and not changed:
            raise VerificationError(f"[{p.name}] returned modified=True but changed nothing; report modified=False.")


def _flat_tensors(out: Any) -> tuple[list[torch.Tensor], Any]:
    leaves, spec = pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)], spec


def relative_error(after: Any, before: Any) -> float:
    """max over outputs of max|after - before| / max|before| (structures must match)."""
    a, spec_a = _flat_tensors(after)
    b, spec_b = _flat_tensors(before)
    if spec_a != spec_b or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if not (x.is_floating_point() or y.is_floating_point()):
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        x, y = x.double(), y.double()
        scale = y.abs().max().item() if y.numel() else 0.0
        diff = (x - y).abs().max().item() if y.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def sqnr_db(reference: Any, output: Any) -> float:
    """Signal-to-noise ratio of ``output`` against ``reference`` over all floating-point outputs, in dB (the
    argument order of ``bench.measure.sqnr_db``)."""
    b, _ = _flat_tensors(reference)
    a, _ = _flat_tensors(output)
    pairs = [(x, y) for x, y in zip(a, b) if y.is_floating_point()]
    noise = sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in pairs)
    signal = sum(float((y.double() ** 2).sum()) for _, y in pairs)
    return math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def within_tolerance(after: Any, before: Any, rtol: float, atol: float) -> bool:
    """Elementwise |a - b| <= atol * max|b| + rtol * |b| for every output tensor."""
    a, spec_a = _flat_tensors(after)
    b, spec_b = _flat_tensors(before)
    if spec_a != spec_b:
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False
            continue
        x, y = x.double(), y.double()
        scale = y.abs().max() if y.numel() else 0.0
        if not bool(((x - y).abs() <= atol * scale + rtol * y.abs()).all()):
            return False
    return True


class Verify(Instrument):
    """Lint, metadata, the pass's own verify, and the numeric check against the previous stage."""

    def __init__(self, numerics: bool = True):
        self.numerics = numerics

    def before(self, ctx, p, index):
        if self.numerics and ctx.run.stage_outputs is None and p.contract is not Contract.CHANGES:
            _, ctx.run.stage_outputs = meta.observe(ctx.gm, ctx.example_inputs)

    def after(self, ctx, p, result, record):
        gm = ctx.gm
        try:
            gm.graph.lint()
        except Exception as exc:  # noqa: BLE001
            raise VerificationError(f"[{p.name}] left an ill-formed graph: {exc}") from exc
        inconsistent = inconsistent_attributes(gm)
        if inconsistent:
            raise VerificationError(f"[{p.name}] left layers whose attributes disagree with their tensors:\n  "
                                    + "\n  ".join(inconsistent[:5]))
        try:
            observed, out = meta.observe(gm, ctx.example_inputs)
        except Exception as exc:  # noqa: BLE001
            raise VerificationError(f"[{p.name}] left a module that fails on the example inputs: "
                                    f"{type(exc).__name__}: {exc}") from exc
        problems = meta.mismatches(gm, observed)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise VerificationError(f"[{p.name}] left stale metadata:\n  " + "\n  ".join(problems[:5]) + more +
                                    "\n  hint: a rewrite must copy or recompute node.meta (see fxcompress.meta).")
        p.verify(ctx)
        before, ctx.run.stage_outputs = ctx.run.stage_outputs, out
        if not self.numerics or p.contract is Contract.CHANGES or before is None:
            return
        record.error = relative_error(out, before)
        if p.contract is Contract.EXACT:
            rtol, atol = p.exact_tolerance
            if not within_tolerance(out, before, rtol, atol):
                error64 = _float64_error(ctx, rtol, atol)
                if error64 is None:
                    raise VerificationError(
                        f"[{p.name}] is EXACT but changed the outputs: max|after - before| / max|before| = "
                        f"{record.error:.3e} (allowed rtol={rtol:g}, atol={atol:g} x output scale, in float32 "
                        f"and in float64).")
                record.notes += (f"numeric check: the float32 difference {record.error:.1e} is rounding noise; "
                                 f"in float64 the stages differ by {error64:.1e}",)
        elif p.contract is Contract.BOUNDED:
            bound = p.error_bound(ctx)
            if not record.error <= bound:
                raise VerificationError(f"[{p.name}] exceeded its error bound: {record.error:.3e} > {bound:.3e}."
                                        + (f"\n  hint: {p.bound_hint(ctx)}" if p.bound_hint(ctx) else ""))


def _float64_error(ctx: CompileContext, rtol: float, atol: float) -> float | None:
    """Both stages rerun in float64; their relative error if within tolerance there, else None.

    Deep float32 nets carry rounding noise of their own (ResNet-50: 2e-5 of the logits against float64), so two
    float32 computations of one function can differ by more than an EXACT tolerance.  In float64 that noise is
    gone and what is left is the function's change (plus the rounding of float32 weights).
    """
    if ctx.run.restore_point is None:
        return None
    inputs = tuple(t.double() if t.is_floating_point() else t for t in ctx.example_inputs)
    try:
        outs = []
        for gm in (ctx.run.restore_point.module(), ctx.gm):
            wide = copy.deepcopy(gm).double()
            with meta.side_effect_free(wide):
                outs.append(wide(*inputs))
    except Exception:  # noqa: BLE001 - a module that cannot run in float64 keeps its float32 verdict
        return None
    before, after = outs
    return relative_error(after, before) if within_tolerance(after, before, rtol, atol) else None


class Dump(Instrument):
    """Numbered dumps of the code after each pass that changed the graph, with its diff and shape changes."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def write_initial(self, gm: torch.fx.GraphModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "00_input.py").write_text(gm.code)

    def after(self, ctx, p, result, record):
        if not (record.diff or record.param_changes):
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = self.directory / f"{record.index + 1:02d}_{p.name}"
        stem.with_suffix(".py").write_text(ctx.gm.code)
        shapes = "".join(f"# {c}\n" for c in record.param_changes)
        stem.with_suffix(".diff").write_text(f"# parameter changes\n{shapes}\n{record.diff}")
        record.dump_path = str(stem.with_suffix(".py"))


REPRO_BATCHES = 32  # calibration/training batches a reproducer keeps


def write_reproducer(directory: Path, ctx: CompileContext, gm: torch.fx.GraphModule, p: Pass, exc: BaseException,
                     analyses: list[Pass] = ()) -> Path:
    """Everything needed to rerun the failing pass on the module it received: the module, the example inputs, the
    plans earlier passes made (``plans.pt``), the first batches of the data, and the passes that recompute the
    analyses it requires (``setup.json``); ``python repro.py`` resumes from them without tracing again."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "code.py").write_text(gm.code)
    (directory / "graph.txt").write_text(str(gm.graph))
    (directory / "error.txt").write_text("".join(traceback.format_exception(exc)))
    (directory / "pass.json").write_text(json.dumps({"pass": p.name, **p.options()}, default=repr, indent=2))
    torch.save(gm.state_dict(), directory / "state_dict.pt")
    torch.save(ctx.example_inputs, directory / "inputs.pt")
    problems = []
    try:
        torch.save(gm, directory / "module.pt")
    except Exception as save_exc:  # noqa: BLE001 - a module with unpicklable parts still gets the rest
        problems.append(f"module.pt: could not save the module: {save_exc}")
    if ctx.model is not None:
        try:
            torch.save(ctx.model, directory / "model.pt")
        except Exception as save_exc:  # noqa: BLE001
            problems.append(f"model.pt: could not save the original model: {save_exc}")
    plans = []
    for name, plan in ctx.plans.items():
        try:
            encode(plan)
            plans.append(plan)
        except Exception as save_exc:  # noqa: BLE001
            problems.append(f"plan {name!r} not saved: {save_exc}")
    save_plans(plans, directory / "plans.pt")  # plain data: fxc.load_plans reads it back
    data = []
    for what in ("calibration_data", "train_data"):
        batches = getattr(ctx, what)
        if batches is not None:
            torch.save(list(itertools.islice(batches, REPRO_BATCHES)), directory / f"{what}.pt")
            data.append(what)
    setup = {"analyses": [{"pass": q.name, **q.options()} for q in analyses], "data": data,
             "eval_fn": ctx.eval_fn is not None}
    (directory / "setup.json").write_text(json.dumps(setup, default=repr, indent=2))
    if setup["eval_fn"]:
        problems.append("eval_fn is not saved (a function); the rerun goes without it")
    if problems:
        (directory / "problems.txt").write_text("\n".join(problems) + "\n")
    (directory / "repro.py").write_text(REPRO_SCRIPT)
    return directory


REPRO_SCRIPT = """\
# Reruns the failing pass on the module it received, with the plans earlier passes made: python repro.py
import json
import pathlib

import torch

import fxcompress as fxc

here = pathlib.Path(__file__).parent
gm = torch.load(here / "module.pt", weights_only=False)
inputs = torch.load(here / "inputs.pt")
spec = json.loads((here / "pass.json").read_text())
setup = json.loads((here / "setup.json").read_text())
plans = fxc.load_plans(here / "plans.pt")
data = {what: torch.load(here / f"{what}.pt", weights_only=False) for what in setup["data"]}
model = None
if (here / "model.pt").exists():  # the original model (distill's teacher): its class must be importable here
    try:
        model = torch.load(here / "model.pt", weights_only=False)
    except Exception as exc:
        print(f"model.pt not loaded ({type(exc).__name__}: {exc}); the rerun goes without the original model")
pm = fxc.PassManager([*setup["analyses"], spec], reproducer_dir=here / "rerun")
ctx = pm.resume(gm, inputs, plans=plans, model=model, **data)
for record in pm.run(ctx):
    print(record.summary())
"""
