"""Every width-search strategy at the same latency budgets on the trained golden models, measured in ONNX Runtime.

    python -m fxcompress.bench.search [--models ...] [--strategies ...] [--epochs N] [--json OUT] [--plot OUT.png]
    python -m fxcompress.bench.search --report OUT.json   # the tables and summary of a saved run

For each model: its fp32 test accuracy; ONNX Runtime's own INT8 of the unpruned model (``quantize_static``, MinMax,
per-channel, U8S8); the floor (the fastest width plan: every channel group at its fewest channels, or the fastest
plan on the latency table when that measures faster; pruned, quantized and measured).  Then a
ladder of latency budgets between the floor and the unpruned model's INT8 latency (``LADDER``), and for
every strategy and budget the recipe of ``recipes/auto_int8.toml`` with that strategy: auto_prune (batch 8,
1 thread, ort-int8) -> recalibrate_bn -> finetune (the same epochs for every strategy) -> quantize (kl_tolerance).
Strategies that score plans score them by validation accuracy; ``uniform`` keeps multiples of 16 channels.
Every result is exported and measured in ORT (not on the table): test accuracy, and latency at batch 8 with 1 thread
as the median of runs alternated with every other result of the model and both references, in one process.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tabulate import tabulate

from fxcompress.passes.pruning.lib import latency, latency_model
from fxcompress.passes.pruning.lib.channel_deps import ChannelGraph
from fxcompress.passes.pruning.lib.width_space import WidthSpace, candidate_groups
from fxcompress.passes.pruning.select_channels import SCORERS

from .. import golden
from ..api import compile as compile_model
from ..errors import RecipeError, VerificationError
from ..export.onnx import export_onnx
from ..export.ort import session
from ..timing import alternated_latency, cpu_model
from ..tracing import trace
from .runner import onnx_outputs, ort_int8_model

MODELS = {  # the fine-tune every strategy gets: optimizer, lr, weight decay (as the models were trained)
    "resnet20-hard-digits": ("sgd", 0.02, 5e-4),
    "vgg-small-hard-digits": ("sgd", 0.02, 5e-4),
    "mobilenetv2-hard-digits": ("adamw", 3e-3, 0.01),
}
STRATEGIES = ("knapsack", "uniform", "sensitivity", "netadapt", "anneal", "auto_compress", "amc")
LADDER = (0.6, 0.3, 0.08)  # budgets: this far from the floor to the unpruned INT8 latency (0 = the floor)
BATCH, THREADS = 8, 1
SEARCH_OPTIONS = {  # per strategy, besides budget/runtime/batch/threads
    "uniform": {"round_to": 16},
    "sensitivity": {"evaluations": 90},
    "netadapt": {"evaluations": 60, "short_term_steps": 5},
    "anneal": {"evaluations": 60},
    "auto_compress": {"evaluations": 40, "admm_rounds": 2},
    "amc": {"evaluations": 100},
}


def floor(name: str, work: Path) -> dict[str, Any]:
    """The unpruned model's and the fastest width plan's INT8 latency: of every group at its fewest channels among
    the widths the search considers (multiples of ``latency.ALIGN``), the fastest plan on the latency table
    (``width_search.fastest``; U8S8 kernels run 4 output channels slower than 16) and, as the search does, the
    fastest once those plans' layers were profiled inside the model, the fastest as measured."""
    model, example = golden.load(name)
    inputs = latency_model.batched(example, BATCH)
    gm = trace(model, inputs, eval_mode=True)
    cg = ChannelGraph(gm)
    groups = candidate_groups(cg)
    shapes = latency.layer_shapes(gm)
    space = WidthSpace(cg, SCORERS["l1"](cg, None, {}), shapes, groups, latency.ALIGN)
    table = latency.build_table(shapes.values(), "ort-int8", THREADS)
    predictor = latency_model.Predictor(table, space, shapes)
    prepared: dict[tuple[int, ...], Any] = {}
    plans, seconds, key, _ = latency_model.measured_floor(  # as the search finds its floor
        predictor, {"full": space.full()},
        lambda some: latency_model.measure_plans(gm, inputs, space, some, "ort-int8", THREADS, runs=100,
                                                 cache=prepared),
        lambda some: latency_model.observe_plans(predictor, gm, inputs, some, prepared, THREADS))
    path = work / f"{name}-floor.onnx"
    path.write_bytes(prepared[tuple(plans[key])])
    return {"full_ms": seconds["full"] * 1e3, "floor_ms": seconds[key] * 1e3, "plan": key,
            "kept": {g.name: g.size - k for g, k in zip(groups, plans[key])},
            "floor": seconds[key] / seconds["full"], "path": str(path)}


def recipe(name: str, strategy: str, budget: float, epochs: int, seed: int = 0) -> list[dict[str, Any]]:
    optimizer, lr, wd = MODELS[name]
    search = {"pass": "auto_prune", "budget": {"latency": budget}, "runtime": "ort-int8", "batch": BATCH,
              "threads": THREADS, "strategy": strategy, **SEARCH_OPTIONS.get(strategy, {})}
    if strategy == "auto_compress":
        search |= {"lr": lr / 2, "epochs": 1}
    return [search, {"pass": "recalibrate_bn"},
            {"pass": "finetune", "epochs": epochs, "optimizer": optimizer, "lr": lr, "weight_decay": wd,
             "seed": seed},
            {"pass": "quantize", "activation_observer": "kl_tolerance"}]


def cell(name: str, strategy: str, budget: float, epochs: int, work: Path, log: Callable[[str], None],
         seeds: int = 1) -> dict:
    """One strategy at one budget: the search once, then recalibrate_bn -> finetune -> quantize for each of
    ``seeds`` fine-tune seeds; the accuracy is their mean (each is in ``accuracies``), the file measured seed 0's."""
    model, example = golden.load(name)
    hard = name.endswith("-hard-digits")
    train_images, _ = golden.digits("train", hard)
    calibration = [train_images[i:i + 64] for i in range(0, 512, 64)]
    images, labels = golden.digits("test", hard)
    data = {"calibration_data": calibration, "train_data": golden.DigitsTraining(hard=hard),
            "eval_fn": golden.accuracy(name, "val")}
    start = time.perf_counter()
    steps = recipe(name, strategy, budget, epochs)
    searched = compile_model(model, example, steps[:1], **data)
    search = next(r for r in searched.history if r.name == "search_widths")
    accuracies, path = [], None
    for seed in range(seeds):
        result = compile_model(searched.module, example, recipe(name, strategy, budget, epochs, seed)[1:], **data)
        out = export_onnx(result.module, example, work / f"{name}-{strategy}-{budget:.3f}-{seed}.onnx")
        accuracies.append(float((torch.from_numpy(onnx_outputs(out, images)).argmax(1) == labels).float().mean()
                                * 100))
        path = path or out
    seconds = time.perf_counter() - start
    accuracy = sum(accuracies) / len(accuracies)
    row = {"model": name, "strategy": strategy, "budget": budget, "accuracy": accuracy, "accuracies": accuracies,
           "path": str(path), "macs": searched.after.macs / searched.before.macs, "search_s": search.seconds,
           "compile_s": seconds, "search_measured_ms": search.stats.get("measured_ms"),
           "budget_ms": search.stats.get("budget_ms"), "kept": search.stats.get("kept"),
           "confirmations": search.stats.get("confirmations"), "fallback": search.stats.get("fallback")}
    log(f"  {strategy} @ {budget:.3f}: accuracy {accuracy:.2f} % ({' / '.join(f'{a:.2f}' for a in accuracies)}), "
        f"MACs {row['macs']:.3f}, search {search.seconds:.1f} s, compile {seconds:.0f} s, "
        f"{row['confirmations']} measurement(s){', fallback: ' + row['fallback'] if row['fallback'] else ''}")
    return row


def measure(paths: dict[str, str], runs: int, block: int = 1) -> dict[str, float]:
    """Median ms per run at batch 8, 1 thread, every model alternated with the others (``block`` runs in a row
    each, the first not counted: ``timing.alternated_latency``)."""
    x = golden.digits("test", True)[0][:BATCH].numpy()
    calls = {}
    for key, path in paths.items():
        sess = session(path, threads=THREADS, spinning=False)
        calls[key] = lambda sess=sess, name=sess.get_inputs()[0].name: sess.run(None, {name: x})
    return {k: v * 1e3 for k, v in alternated_latency(calls, runs, warmup=5, block=block).items()}


def bench_model(name: str, strategies: list[str], epochs: int, runs: int, work: Path,
                log: Callable[[str], None], ladder: tuple[float, ...] = LADDER, seeds: int = 1) -> dict[str, Any]:
    log(f"{name}: references ...")
    model, example = golden.load(name)
    fp32 = golden.accuracy(name)(model)
    ort = ort_int8_model(name, work / f"{name}-ort-int8.onnx")
    train_images = golden.digits("train", name.endswith("-hard-digits"))[0]
    ours = compile_model(model, example, [{"pass": "quantize", "activation_observer": "kl_tolerance"}],
                         calibration_data=[train_images[i:i + 64] for i in range(0, 512, 64)])
    ours_path = export_onnx(ours.module, example, work / f"{name}-int8.onnx")
    low = floor(name, work)
    budgets = [round(low["floor"] + t * (1 - low["floor"]), 3) for t in ladder]
    log(f"  floor {low['floor']:.3f} of the unpruned latency; budgets {budgets}")
    rows, refused, failed = [], [], []
    for b in budgets:
        for s in strategies:
            try:
                rows.append(cell(name, s, b, epochs, work, log, seeds))
            except RecipeError as exc:  # a budget the strategy's own widths cannot reach (uniform's multiples of 16)
                refused.append({"strategy": s, "budget": b, "reason": str(exc)})
                log(f"  {s} @ {b:.3f}: refused: {exc}")
            except VerificationError as exc:  # a plan so narrow that its INT8 lowering fails its error bound
                failed.append({"strategy": s, "budget": b, "reason": str(exc).splitlines()[0]})
                log(f"  {s} @ {b:.3f}: failed: {failed[-1]['reason']}")
    paths = {"ORT INT8": str(work / f"{name}-ort-int8.onnx"), "int8": str(ours_path), "floor": low.pop("path"),
             **{f"{r['strategy']}@{r['budget']}": r["path"] for r in rows}}
    ms = measure(paths, runs)
    for r in rows:
        r["ms"] = ms[f"{r['strategy']}@{r['budget']}"]
        r["vs_ort"] = r["ms"] / ms["ORT INT8"]
        r["within_budget"] = r["ms"] <= r["budget"] * ms["int8"] * 1.05
        del r["path"]
    low["measured_ms"] = ms["floor"]  # in the same runs as every result
    return {"model": name, "fp32": fp32, "ort_int8": {"accuracy": ort["accuracy"], "ms": ms["ORT INT8"]},
            "int8_ms": ms["int8"], "floor": low, "budgets": budgets, "rows": rows, "refused": refused,
            "failed": failed}


def _floor_ms(m: dict[str, Any]) -> float:
    """The width floor in the runs of the results (older reports: rescaled from its own runs)."""
    return m["floor"].get("measured_ms") or m["floor"]["floor_ms"] * m["int8_ms"] / m["floor"]["full_ms"]


def _per_seed(a: dict[str, Any], b: dict[str, Any]) -> str:
    """The accuracy differences seed by seed, when the results have more than one."""
    pairs = list(zip(a.get("accuracies", []), b.get("accuracies", [])))
    return "" if len(pairs) < 2 else f" (per seed {' / '.join(f'{x - y:+.2f}' for x, y in pairs)})"


def accuracy_at(rows: list[dict[str, Any]], ms: float) -> float | None:
    """A strategy's accuracy at a measured latency, interpolated linearly between its results (None outside
    them)."""
    pts = sorted((r["ms"], r["accuracy"]) for r in rows)
    if not pts or not pts[0][0] <= ms <= pts[-1][0]:
        return None
    return float(np.interp(ms, [p[0] for p in pts], [p[1] for p in pts]))


def latency_for(rows: list[dict[str, Any]], accuracy: float) -> float | None:
    """The measured latency at which a strategy's results first reach ``accuracy``, going from its fastest result
    up and interpolating linearly between neighbours (None when none reaches it)."""
    pts = sorted((r["ms"], r["accuracy"]) for r in rows)
    for i, (ms, acc) in enumerate(pts):
        if acc >= accuracy:
            if i == 0:
                return ms
            (ms0, acc0) = pts[i - 1]
            return ms0 + (accuracy - acc0) * (ms - ms0) / (acc - acc0)
    return None


def summary(report: dict[str, Any]) -> list[str]:
    """What the acceptance asks, read off the measurements."""
    lines = []
    for m in report["models"]:
        good = [r for r in m["rows"] if r["accuracy"] >= m["fp32"] - 1.0]
        floor_ms = _floor_ms(m)
        if good:
            best = min(good, key=lambda r: r["ms"])
            lines.append(f"{m['model']}: fastest within 1 point of fp32 ({m['fp32']:.2f} %): {best['strategy']} at "
                         f"budget {best['budget']}, {best['ms']:.3f} ms = {1 / best['vs_ort']:.2f}x faster than ORT "
                         f"INT8 ({best['accuracy']:.2f} %); the width floor is {floor_ms:.3f} ms "
                         f"({best['ms'] / floor_ms:.2f}x the floor)")
        else:
            lines.append(f"{m['model']}: no result within 1 point of fp32 ({m['fp32']:.2f} %)")
        by = {(r["strategy"], r["budget"]): r for r in m["rows"]}
        for b in m["budgets"]:
            k, u = by.get(("knapsack", b)), by.get(("uniform", b))
            if k and u:
                lines.append(f"  budget {b}: knapsack {k['accuracy']:.2f} % at {k['ms']:.3f} ms vs uniform (round_to "
                             f"16) {u['accuracy']:.2f} % at {u['ms']:.3f} ms: {k['accuracy'] - u['accuracy']:+.2f} "
                             f"points, {(1 - k['ms'] / u['ms']) * 100:+.1f} % time saved" + _per_seed(k, u))
        uniform = [r for r in m["rows"] if r["strategy"] == "uniform"]
        for k in (r for r in m["rows"] if r["strategy"] == "knapsack"):
            at = accuracy_at(uniform, k["ms"])
            if at is not None:
                lines.append(f"  at knapsack's {k['ms']:.3f} ms (budget {k['budget']}) uniform reaches {at:.2f} % "
                             f"(interpolated): knapsack {k['accuracy'] - at:+.2f} points at equal latency")
            ms = latency_for(uniform, k["accuracy"])
            lines.append(f"  at knapsack's {k['accuracy']:.2f} % (budget {k['budget']}) " + (
                f"uniform reaches it at {ms:.3f} ms (interpolated): knapsack {(1 - k['ms'] / ms) * 100:+.1f} % time "
                f"saved at equal accuracy" if ms is not None else "no uniform result is as accurate"))
    for m in report["models"]:
        lines.extend(f"{m['model']} {r['strategy']}@{r['budget']} refused: {r['reason']}" for r in m.get("refused", ()))
        lines.extend(f"{m['model']} {r['strategy']}@{r['budget']} failed: {r['reason']}" for r in m.get("failed", ()))
    over = [f"{r['model']} {r['strategy']}@{r['budget']}" for m in report["models"] for r in m["rows"]
            if not r["within_budget"]]
    lines.append("every result within its budget (+5 %)" if not over else f"over budget (+5 %): {', '.join(over)}")
    return lines


def format_table(report: dict[str, Any], order: Callable[[dict[str, Any]], Any] | None = None,
                 method: str = "strategy", budget: str = "budget") -> str:
    """A row per result (in ``order`` within each model, else as run) under the references' row; ``method`` and
    ``budget`` name those columns."""
    rows = []
    for m in report["models"]:
        rows.append([m["model"], "fp32 / ORT INT8 / ours INT8", "-", f"- / {m['ort_int8']['ms']:.3f} / "
                     f"{m['int8_ms']:.3f}", "1.00", "1.000", f"{m['fp32']:.2f} / {m['ort_int8']['accuracy']:.2f}",
                     "-", "-", "-"])
        for r in m["rows"] if order is None else sorted(m["rows"], key=order):
            rows.append([m["model"], r["strategy"], r["budget"], f"{r['ms']:.3f}", f"{r['vs_ort']:.2f}",
                         f"{r['macs']:.3f}", f"{r['accuracy']:.2f}", f"{r['accuracy'] - m['fp32']:+.2f}",
                         f"{r['search_s']:.1f}", "yes" if r["within_budget"] else "NO"])
    return tabulate(rows, headers=["model", method, budget, "ms (b8, 1 thr)", "x ORT INT8", "MACs",
                                   "test acc %", "vs fp32", "search s", "in budget"], tablefmt="github")


def pivot(report: dict[str, Any]) -> str:
    """The README's table: a row per model and budget, a column per strategy, each cell accuracy % / latency as a
    multiple of ORT's INT8 of the unpruned model ("over" when the result missed its budget by more than 5 %)."""
    strategies = list(dict.fromkeys(r["strategy"] for m in report["models"] for r in m["rows"]))
    rows = []
    for m in report["models"]:
        by = {(r["strategy"], r["budget"]): r for r in m["rows"]}
        for b in m["budgets"]:
            cells = []
            for s in strategies:
                r = by.get((s, b))
                cells.append("-" if r is None else f"{r['accuracy']:.1f} / {r['vs_ort']:.2f}"
                             + ("" if r["within_budget"] else " (over)"))
            rows.append([f"{m['model']} ({m['fp32']:.2f} / {m['ort_int8']['ms']:.2f})", b, *cells])
    seconds = {s: [r["search_s"] for m in report["models"] for r in m["rows"] if r["strategy"] == s]
               for s in strategies}
    table = tabulate(rows, headers=["model (fp32 % / ORT INT8 ms)", "budget", *strategies], tablefmt="github")
    return table + "\n\nSearch seconds per cell (latency measurements included): " + ", ".join(
        f"{s} {min(v):.0f}-{max(v):.0f}" for s, v in seconds.items() if v) + "."


def plot(report: dict[str, Any], path: str,
         mark: Callable[[dict[str, Any]], tuple[float, str]] = lambda m: (_floor_ms(m), "width floor")) -> None:
    """Accuracy against measured latency, a panel per model, a line per strategy; ``mark`` gives each panel's
    dashed vertical line (ms, label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        for strategy in dict.fromkeys(r["strategy"] for r in m["rows"]):
            pts = sorted((r["ms"], r["accuracy"]) for r in m["rows"] if r["strategy"] == strategy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, label=strategy)
        ax.scatter([m["ort_int8"]["ms"]], [m["ort_int8"]["accuracy"]], marker="*", s=140, color="black",
                   label="ORT INT8 (unpruned)", zorder=5)
        ax.axhline(m["fp32"] - 1.0, color="gray", linestyle=":", linewidth=1, label="fp32 - 1 point")
        ms, label = mark(m)
        ax.axvline(ms, color="gray", linestyle="--", linewidth=1, label=label)
        ax.set_title(m["model"])
        ax.set_xlabel("measured ms (ORT, batch 8, 1 thread)")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fxcompress.bench.search", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--epochs", type=int, default=8, help="fine-tune epochs, the same for every strategy")
    parser.add_argument("--runs", type=int, default=100, help="alternated latency runs (default 100)")
    parser.add_argument("--ladder", type=float, nargs="*", default=list(LADDER),
                        help="budgets as positions from the width floor (0) to the unpruned INT8 latency (1)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="fine-tune seeds per result; its accuracy is their mean (default 1)")
    parser.add_argument("--json", metavar="OUT.json")
    parser.add_argument("--plot", metavar="OUT.png")
    parser.add_argument("--report", metavar="IN.json", help="print the tables and summary of a saved --json report "
                        "(and --plot it) instead of running")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.report:
        report = json.loads(Path(args.report).read_text())
    else:
        report = {"cpu": cpu_model(), "epochs": args.epochs, "seeds": args.seeds, "models": []}
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="fxcompress-search-") as tmp:
            for name in args.models:
                report["models"].append(bench_model(name, args.strategies, args.epochs, args.runs, Path(tmp),
                                                    lambda m: print(m, file=sys.stderr, flush=True),
                                                    tuple(args.ladder), args.seeds))
                if args.json:
                    Path(args.json).write_text(json.dumps(report, indent=1))
        report["seconds"] = time.perf_counter() - start
    print(f"CPU: {report['cpu']}; fine-tune {report['epochs']} epochs for every strategy, accuracy the mean of "
          f"{report.get('seeds', 1)} fine-tune seed(s); {report.get('seconds', math.nan) / 60:.0f} min in all")
    print(format_table(report))
    print("\n" + pivot(report))
    print("\n" + "\n".join(summary(report)))
    if args.json and not args.report:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    main()
