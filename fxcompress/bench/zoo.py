"""``python -m fxcompress.bench.zoo``: the conformance suite on third-party models, beside Torch-Pruning.

    python -m fxcompress.bench.zoo [--suites torchvision segmentation detection timm hf] [--models SPEC ...]
                                   [--ratio 0.3] [--timeout 900] [--json out.json] [--readme README.md]

Every torchvision classification, segmentation and detection model, the smallest variant of every timm family
(fewest parameters, measured on the meta device; timm's ``test_*`` models left out) and a list of Hugging Face
architectures in small configurations, all with random weights and randomised BatchNorm statistics (no downloads).
``--models`` takes other models too: any timm name (``timm:resnet50``), any torchvision name, and any transformers
model type (``hf:electra``: ``AutoModel`` of its default config with the usual size fields made small).
Each model runs in its own process with a timeout through the steps of the coverage table:

- **trace**: ``compile`` with ``fold_bn`` makes a graph (symbolic tracing, or torch.export when that fails);
- **fold**: the folded model's outputs equal the model's to 1e-5 of the output scale (largest absolute output),
  in float32, or in float64 where the model's own float32 rounding is larger (recorded as ``fold (float64)``);
- **prune**: ``prune`` at ``--ratio`` ran in mask mode and in remove mode;
- **remove = mask**: their outputs agree to 1e-4 of the output scale, or the pass reported an inexact group;
- **export**: the pruned model exported to ONNX runs in ONNX Runtime within 1e-4 of the output scale;
- **int8**: ``quantize`` (static for images, dynamic for token inputs) exports and runs in ONNX Runtime;
- **torch-pruning**: Torch-Pruning's ``MetaPruner`` (L1 magnitude, same ratio, last layer ignored) ran.

Also recorded: the share of channels in prunable groups, the MACs kept by both tools at the ratio (counted by the
same counter) and the share of the channels each removed (the table shows both where Torch-Pruning removed over 5
points more than the ratio made us remove: it was not pruning at the same ratio), the graph's front end, and the
first line of every failure.  A cell is ``ok``, ``inexact`` (remove
differs from mask where the pass said it would), ``-`` (an earlier step failed) or ``FAIL``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from tabulate import tabulate
from torch.utils import _pytree as pytree

import fxcompress as fxc

from .. import pieces
from ..counting import totals
from ..tracing import trace
from .measure import cpu_model
from .zoo_models import (  # noqa: F401  (the suite's models, part of this module's interface)
    HF_MODELS,
    SUITES,
    build,
    catalogue,
    detect_something,
    randomize_bn,
    randomize_quiet_parameters,
    smallest_timm_models,
)

STEPS = ("trace", "fold", "prune", "remove = mask", "export", "int8", "torch-pruning")
FOLD_TOL, REMOVE_TOL, ORT_TOL = 1e-5, 1e-4, 1e-4
README_BEGIN, README_END = "<!-- zoo:begin -->", "<!-- zoo:end -->"

def _call(model: nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _floats(out: Any) -> list[torch.Tensor]:
    return [t.detach() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


VANISHING = 1e-20  # a reference output whose largest |value| is smaller is refused (near float32's denormals)


def relative_error(got: Any, want: Any) -> float:
    """max |got - want| / max |want| over the floating-point leaves; inf when the structures or shapes differ."""
    a, b = _floats(got), _floats(want)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    if not b:
        return 0.0
    if not any(bool(y.any()) for y in b):
        raise ValueError("the reference output is all zeros: a comparison with it proves nothing (a zero-initialised "
                         "layer that randomize_quiet_parameters did not redraw?)")
    scale = max(float(y.abs().max()) if y.numel() else 0.0 for y in b) or 1.0
    if scale < VANISHING:
        raise ValueError(f"the reference output vanishes (largest |value| {scale:.1e}): float32 rounding decides "
                         f"every comparison (BatchNorm weights drawn near 0 that randomize_bn did not reach?)")
    return max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b)) / scale


def compare(result: Any, reference: nn.Module, inputs: Any) -> float:
    """``relative_error`` of a compiled module against ``reference`` (the model, or another compiled module); for
    a model compiled piece by piece, the largest over its pieces, each on what it receives: the rest is the model's
    own code, and its outputs (detections: top-k and NMS over near-equal scores of random weights) reorder on any
    rounding."""
    if result.trace.front_end != "pieces":
        return relative_error(_call(result.module, inputs), _call(reference, inputs))
    prefix = "module." if isinstance(reference, torch.fx.GraphModule) else ""  # a compiled one's holder
    calls = pieces.record_calls(reference, [tuple(inputs)])[0]
    errors = []
    for name in dict.fromkeys(h.piece for h in result.history):
        args = calls[prefix + name][0]
        errors.append(relative_error(_call(result.module.get_submodule("module." + name), args),
                                     _call(reference.get_submodule(prefix + name), args)))
    return max(errors)


def compare_float64(result: Any, reference: nn.Module, inputs: Any) -> float:
    """``relative_error`` with copies of both modules and the floating-point inputs in float64: for an exact rewrite
    of a model whose own float32 rounding exceeds the tolerance (timm's Visformer with random weights moves by 3e-5
    under a 1e-7 change of its input, and by 1e-5 between 1 and 2 threads), the rewrite is judged where rounding
    is 2^29 times smaller, as the pass's own numeric check does.  Pieces: the float32 error (not rerun)."""
    if result.trace.front_end == "pieces":
        return compare(result, reference, inputs)
    def wide(x: Any) -> Any:
        return pytree.tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)
    got = copy.deepcopy(result.module).double()
    want = copy.deepcopy(reference).double()
    return relative_error(_call(got, wide(inputs)), _call(want, wide(inputs)))


def _first_line(exc: BaseException) -> str:
    """The exception's type and message, its lines joined, cut at 300 characters."""
    text = " / ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}"[:300]


def _last_layer(model: nn.Module) -> nn.Module | None:
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1] if layers else None


def _prune_stats(result: Any) -> dict[str, Any]:
    """Share of channels in prunable groups, inexact groups and barrier ops (summed over the pieces)."""
    records = [h.stats for h in result.history if h.name == "propagate_dependencies"]
    total = {k: sum(r[k] for r in records) for k in ("channels", "prunable_channels", "inexact_groups", "barrier_ops")}
    return {"share": total["prunable_channels"] / max(total["channels"], 1), "inexact_groups": total["inexact_groups"],
            "barriers": total["barrier_ops"]}


def _ort_outputs(path: Path, inputs: Any) -> list:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options)
    names = [i.name for i in session.get_inputs()]
    flat = list(inputs.values()) if isinstance(inputs, dict) else pytree.tree_leaves(inputs)
    return session.run(None, {n: t.numpy() for n, t in zip(names, flat)})


def _ort_error(path: Path, inputs: Any, want: Any) -> float:
    got = [torch.from_numpy(o) for o in _ort_outputs(path, inputs) if o.dtype.kind == "f"]
    return relative_error(got, _floats(want))


@contextlib.contextmanager
def limits(seconds: float, gigabytes: float):
    """Raise ``TimeoutError`` or ``MemoryError`` in this (main) thread once ``seconds`` have passed or the process's
    resident memory exceeds ``gigabytes`` (checked every 0.2 s), instead of being killed by the system."""
    reason: list[BaseException] = []

    def interrupt(*_):
        raise reason[0]
    done = threading.Event()

    def watch() -> None:
        start = time.perf_counter()
        while not done.wait(0.2):
            if time.perf_counter() - start > seconds:
                reason.append(TimeoutError(f"still running after {seconds:g} s"))
            elif resident_gb() > gigabytes:
                reason.append(MemoryError(f"over {gigabytes:g} GB of memory"))
            else:
                continue
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
            return
    previous = signal.signal(signal.SIGUSR1, interrupt)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)


def resident_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def check(spec: str, ratio: float, work: Path, tp_seconds: float = 300.0, tp_gigabytes: float = 12.0,
          progress: Path | None = None) -> dict[str, Any]:
    """Run every step on one model; a step after a failed one it needs is ``-``.  Torch-Pruning gets
    ``tp_seconds`` and ``tp_gigabytes`` (it does not finish on some models, and fills the memory on others), so that
    its failure does not lose our row.  With ``progress``, the row so far is written there before and after every
    step (``running``: the step under way), so that a process killed on the way (out of memory, time-out) still
    tells what passed and where it stopped.  Each result is dropped once its steps are done: a model of a few GB
    must fit with its copies."""
    row: dict[str, Any] = {"model": spec, "steps": dict.fromkeys(STEPS, "-"), "errors": {}}
    steps, errors = row["steps"], row["errors"]

    def save() -> None:
        if progress is not None:
            progress.write_text(json.dumps(row))

    def attempt(step: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        row["running"] = step
        save()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001  (the suite records every failure and goes on)
            steps[step], errors[step] = "FAIL", _first_line(exc)
            row.setdefault("tracebacks", {})[step] = traceback.format_exc()[-2000:]
            value = None
        row.setdefault("seconds", {})[step] = round(time.perf_counter() - start, 2)
        del row["running"]
        save()
        return value

    def verdict(step: str, err: float, tol: float, inexact: bool = False) -> None:
        row.setdefault("errors_measured", {})[step] = err
        if err <= tol:
            steps[step] = "ok"
        elif inexact:
            steps[step] = "inexact"
        else:
            steps[step], errors[step] = "FAIL", f"relative error {err:.2e} > {tol:g}"

    model, inputs, sample = build(spec)
    folded = attempt("trace", lambda: fxc.compile(model, inputs, [{"pass": "fold_bn"}]))
    if folded is None:
        return row
    steps["trace"] = "ok"
    row["front_end"] = folded.trace.front_end
    row["auto_leaves"] = len(folded.trace.auto_leaves)
    verdict("fold", compare(folded, model, inputs), FOLD_TOL)
    if steps["fold"] == "FAIL":  # rounding noise of an ill-conditioned model, or a wrong fold: float64 tells
        row["errors_measured"]["fold (float64)"] = err64 = compare_float64(folded, model, inputs)
        if err64 <= FOLD_TOL:
            steps["fold"] = "ok"
            del errors["fold"]
    del folded

    def prune(mode: str):
        return fxc.compile(model, inputs, [{"pass": "prune", "ratio": ratio, "mode": mode}])
    pruned = attempt("prune", lambda: (prune("mask"), prune("remove")))
    if pruned is not None:
        mask, removed = pruned
        steps["prune"] = "ok"
        row.update(_prune_stats(removed), macs_kept=removed.after.macs / max(removed.before.macs, 1),
                   channels_removed=channels_removed(widths(model), removed.module))
        verdict("remove = mask", compare(removed, mask.module, inputs), REMOVE_TOL,
                inexact=row["inexact_groups"] > 0)
        del pruned, mask
        error = attempt("export", lambda: max(_ort_error(r.export_onnx(work / "pruned.onnx"), r.example_inputs,
                                                         _call(r.module, r.example_inputs))
                                              for r in (removed.pieces or {"": removed}).values()))
        if error is not None:
            verdict("export", error, ORT_TOL)
        del removed

    def int8() -> float:
        dynamic = isinstance(inputs, dict) and "input_ids" in inputs
        options = {"mode": "dynamic"} if dynamic else {}
        calibration = [tuple(s.values()) if isinstance(s, dict) else s for s in map(sample, range(2, 6))]
        q = fxc.compile(model, inputs, [{"pass": "quantize", **options}], calibration_data=calibration)
        for r in (q.pieces or {"": q}).values():  # a model compiled piece by piece: each piece in ORT
            _ort_outputs(r.export_onnx(work / "int8.onnx"), r.example_inputs)
        return 0.0
    if attempt("int8", int8) is not None:
        steps["int8"] = "ok"
    if _have_torch_pruning():
        def contender() -> float | None:
            with limits(tp_seconds, tp_gigabytes):
                return torch_pruning_macs(model, inputs, ratio)
        kept = attempt("torch-pruning", contender)  # (None, cut): it ran, its result did not trace
        if kept is not None:
            steps["torch-pruning"] = "ok"
            row["tp_macs_kept"], row["tp_channels_removed"] = kept
            at_its_cut(row, model, inputs)
    return row


def at_its_cut(row: dict[str, Any], model: nn.Module, inputs: Any) -> None:
    """Where Torch-Pruning removed over 5 points more of the channels than we did at the ratio asked, ours again at
    the share it removed, so that MACs are compared at an equal cut: ``macs_kept_at_tp_cut``,
    ``channels_removed_at_tp_cut`` (or ``at_tp_cut_error``)."""
    cut, ours = row.get("tp_channels_removed"), row.get("channels_removed")
    if cut is None or ours is None or cut <= ours + 0.05 or cut >= 1:
        return
    try:
        again = fxc.compile(model, inputs, [{"pass": "prune", "ratio": round(cut, 4), "mode": "remove"}])
    except Exception as exc:  # noqa: BLE001  (the row keeps the comparison at the ratio asked)
        row["at_tp_cut_error"] = _first_line(exc)
        return
    row["macs_kept_at_tp_cut"] = again.after.macs / max(again.before.macs, 1)
    row["channels_removed_at_tp_cut"] = channels_removed(widths(model), again.module)


def _have_torch_pruning() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def widths(model: nn.Module) -> dict[str, int]:
    """The output channels of every convolution and Linear layer, by qualified name."""
    return {name: m.weight.shape[1 if isinstance(m, nn.modules.conv._ConvTransposeNd) else 0]
            for name, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


def channels_removed(before: dict[str, int], after: nn.Module) -> float:
    """The share of the output channels of convolutions and Linear layers (those present in both) that pruning
    removed."""
    now = widths(after)
    common = before.keys() & now.keys()
    return 1 - sum(now[k] for k in common) / max(sum(before[k] for k in common), 1)


def torch_pruning_macs(model: nn.Module, inputs: Any, ratio: float) -> tuple[float | None, float]:
    """Torch-Pruning's L1 ``MetaPruner`` at ``ratio`` (last layer ignored): the share of MACs it keeps, counted by
    the counter that counts ours (None when its pruned model no longer traces), and the share of the channels it
    removed (more than the ratio asks where it prunes a group more than once: GhostNet's ghost modules)."""
    import torch_pruning as tp
    model = copy.deepcopy(model)
    original = widths(model)
    last = _last_layer(model)
    example = dict(inputs) if isinstance(inputs, dict) else tuple(inputs)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=[last] if last is not None else [])
    try:
        before = totals(trace(model, inputs, share_tensors=True)).macs
    except Exception:  # noqa: BLE001  (a model we compile piece by piece: no whole graph to count on)
        before = None
    pruner.step()
    _call(model, inputs)
    cut = channels_removed(original, model)
    if before is None:
        return None, cut
    try:
        after = totals(trace(model, inputs, share_tensors=True)).macs
    except Exception:  # noqa: BLE001  (it ran; only its MACs are not counted)
        return None, cut
    return after / max(before, 1), cut


def run_isolated(spec: str, ratio: float, timeout: float, tp_seconds: float = 300.0) -> dict[str, Any]:
    """``check`` in a fresh process, so that one model's crash, leak or hang cannot take the others down; a process
    that ends early gives the row it had written so far, the step under way failed with the reason."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        progress = Path(tmp) / "row.json"
        command = [sys.executable, "-m", "fxcompress.bench.zoo", "--one", spec, "--ratio", str(ratio),
                   "--progress", str(progress), "--tp-seconds", str(tp_seconds)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            lines = done.stdout.strip().splitlines()
            if done.returncode == 0 and lines:
                row = json.loads(lines[-1])
                row["seconds"]["total"] = round(time.perf_counter() - start, 1)
                return row
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            why = f"process ended with code {done.returncode}" + (
                " (killed: out of memory?)" if done.returncode == -signal.SIGKILL else "") + f": {tail[:300]}"
        except subprocess.TimeoutExpired:
            why = f"timed out after {timeout:g} s"
        row = json.loads(progress.read_text()) if progress.exists() else \
            {"model": spec, "steps": dict.fromkeys(STEPS, "-"), "errors": {}}
    step = row.pop("running", None)
    if step is not None:
        row["steps"][step] = "FAIL"
        row["errors"][step] = why
    else:
        row["errors"]["run"] = why
    row.setdefault("seconds", {})["total"] = round(time.perf_counter() - start, 1)
    return row


def step_passed(row: dict[str, Any], step: str) -> bool:
    return row["steps"][step] in ("ok", "inexact")


def coverage_table(rows: list[dict[str, Any]]) -> str:
    """Per suite: models tried and how many pass each step."""
    table = []
    for suite in SUITES:
        mine = [r for r in rows if r["model"].startswith(suite + ":")]
        if mine:
            table.append([suite, len(mine), *(sum(step_passed(r, s) for r in mine) for s in STEPS),
                          sum(all(step_passed(r, s) for s in STEPS[:-1]) for r in mine)])
    return tabulate(table, headers=["suite", "tried", *STEPS, "every step"], tablefmt="github")


def model_table(rows: list[dict[str, Any]]) -> str:
    """Per model: each step, the prunable share, MACs kept by us and by Torch-Pruning, the first failure."""
    def pct(x: float | None) -> str:
        return "" if x is None else f"{100 * x:.0f} %"
    def theirs(r: dict[str, Any]) -> str:  # more channels removed than ours: both shares, and ours at its cut
        cut, ours = r.get("tp_channels_removed"), r.get("channels_removed")
        over = cut is not None and ours is not None and cut > ours + 0.05
        if not over:
            return pct(r.get("tp_macs_kept"))
        again = r.get("macs_kept_at_tp_cut")
        equal = "" if again is None else (f"; removing {pct(r['channels_removed_at_tp_cut'])} we keep "
                                          f"{pct(again)}")
        return f"{pct(r.get('tp_macs_kept'))} (removes {pct(cut)} of the channels, we {pct(ours)}{equal})"
    table = []
    for r in rows:
        why = next(iter(r["errors"].items()), None)
        table.append([r["model"], *(r["steps"][s] for s in STEPS), pct(r.get("share")), pct(r.get("macs_kept")),
                      theirs(r), "" if why is None else f"{why[0]}: {why[1]}"[:160]])
    return tabulate(table, headers=["model", *STEPS, "prunable", "MACs kept", "TP MACs kept", "first failure"],
                    tablefmt="github")


def markers(section: str | None) -> tuple[str, str]:
    """The README markers around the zoo tables (``<!-- zoo:begin -->``), or around a named section's."""
    if section is None:
        return README_BEGIN, README_END
    return README_BEGIN.replace(" -->", f" {section} -->"), README_END.replace(" -->", f" {section} -->")


def write_readme(readme: Path, rows: list[dict[str, Any]], commands: list[str], header: str,
                 section: str | None = None) -> None:
    """Replace the text between the zoo markers of ``readme`` (of ``section``'s, if named) with the tables of
    ``rows``, made by ``commands``."""
    text = readme.read_text()
    begin, end = markers(section)
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} ... {end} section to fill")
    made = "; ".join(f"`{c}`" for c in commands)
    body = (f"{begin}\n{header}; made by {made}:\n\n{coverage_table(rows)}\n\n<details><summary>Per "
            f"model: each step, the share of channels in prunable groups, the MACs kept at the ratio (Torch-Pruning's "
            f"counted by the same counter; where it removed over 5 points more of the channels than we did, both "
            f"shares), the first failure</summary>\n\n{model_table(rows)}\n\n</details>\n"
            f"{end}")
    pattern = re.escape(begin) + ".*?" + re.escape(end)
    readme.write_text(re.sub(pattern, lambda _: body, text, flags=re.S))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m fxcompress.bench.zoo", description=__doc__.split("\n")[0])
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)
    parser.add_argument("--models", nargs="+",
                        help="specs suite:name instead of whole suites (hf:bert, hf:<model type>, timm:<any name>)")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    parser.add_argument("--tp-seconds", type=float, default=300.0,
                        help="seconds Torch-Pruning gets per model (it hangs on some)")
    parser.add_argument("--json", type=Path, help="write every row (with tracebacks) here")
    parser.add_argument("--update", action="store_true",
                        help="keep the rows of --json for the models not run now (rerun some, tabulate all)")
    parser.add_argument("--resume", action="store_true",
                        help="with --update: run only the models that have no row in --json yet (an interrupted run)")
    parser.add_argument("--tabulate", action="store_true", help="run nothing: tabulate the rows of --json")
    parser.add_argument("--readme", type=Path, help="fill the README's zoo section with the tables")
    parser.add_argument("--section", help="with --readme: fill the section marked <!-- zoo:begin SECTION --> instead")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one model, JSON on the last line
    parser.add_argument("--progress", type=Path, help=argparse.SUPPRESS)  # the child's row so far
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(check(args.one, args.ratio, Path(tmp), tp_seconds=args.tp_seconds,
                                   progress=args.progress)))
        return []
    if (args.update or args.tabulate) and not (args.json and args.json.exists()):
        parser.error("--update and --tabulate need --json naming an earlier run's file")
    if args.resume and not args.update:
        parser.error("--resume continues an earlier run: give it with --update and that run's --json")
    earlier = json.loads(args.json.read_text()) if args.update or args.tabulate else {"rows": [], "commands": []}
    rows = {r["model"]: r for r in earlier["rows"]}
    commands = list(earlier.get("commands", []))
    if not args.tabulate:
        commands.append("python -m fxcompress.bench.zoo " + " ".join(argv if argv is not None else sys.argv[1:]))
        specs = args.models or [s for suite in args.suites for s in catalogue(suite)]
        unknown = [s for s in specs if s.partition(":")[0] not in SUITES]
        if unknown:
            parser.error(f"--models {' '.join(unknown)}: a spec is suite:name with suite one of {', '.join(SUITES)} "
                         f"(e.g. timm:{unknown[0].rpartition(':')[2]})")
        if args.resume:
            specs = [s for s in specs if s not in rows]
        for spec in specs:
            row = rows[spec] = run_isolated(spec, args.ratio, args.timeout, args.tp_seconds)
            print(f"{spec}: {' '.join(row['steps'][s] for s in STEPS)} ({row['seconds']['total']} s)"
                  + (f"  {row['errors']}" if row["errors"] else ""), flush=True)
            if args.json:
                report = {"cpu": cpu_model(), "torch": torch.__version__, "ratio": args.ratio, "commands": commands,
                          "rows": list(rows.values())}
                args.json.write_text(json.dumps(report, indent=1))
    order = {suite: i for i, suite in enumerate(SUITES)}
    table = sorted(rows.values(), key=lambda r: order[r["model"].partition(":")[0]])
    print(coverage_table(table))
    print(model_table(table))
    if args.readme:
        cpu = earlier.get("cpu", cpu_model())
        header = f"{cpu}, torch {earlier.get('torch', torch.__version__)}, ratio {earlier.get('ratio', args.ratio)}"
        write_readme(args.readme, table, commands, header, args.section)
    return table


if __name__ == "__main__":
    main()
