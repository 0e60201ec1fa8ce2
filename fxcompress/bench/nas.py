"""Once-for-all NAS on the trained golden models: one supernet training, a subnet per latency budget, beside the
width search (knapsack) and uniform pruning given as many training epochs per result.

    python -m fxcompress.bench.nas [--models ...] [--epochs 10] [--budgets 0.33 0.5 0.8]
                                   [--nas-budgets 0.2 0.27 0.4 0.6 0.7 0.9] [--strategies knapsack uniform] [--runs 100]
                                   [--val-redraws 2]
                                   [--json OUT] [--plot OUT.png]
    python -m fxcompress.bench.nas --report IN.json [IN.json ...] [--plot OUT.png]

For each model: its fp32 test accuracy, ONNX Runtime's INT8 of the unpruned model (``quantize_static``, MinMax,
per-channel, U8S8) and ours.  Budgets are fractions of ORT's INT8 latency (batch 8, 1 thread), measured beside ours
at the start: ``--budgets`` for every method, ``--nas-budgets`` for the supernet's subnets alone (a subnet per
budget costs a search, not a training).

- **nas**: the model made a supernet (``passes/nas``: every prunable group at 1/4, 1/2, 3/4 and all of its channels
  in multiples of 4, every skippable residual block on or off), trained once for 3 x ``--epochs`` epochs by the
  sandwich rule with the fine-tune's optimizer; then for every budget the evolutionary search on the measured-latency
  prediction, scored by validation accuracy with BatchNorm re-estimated (the 360 validation images and
  ``VAL_REDRAWS`` fresh hardenings of them: a ranking of close subnets on 360 images is mostly noise), the chosen
  subnet confirmed in ORT, extracted, quantized (kl_tolerance) and exported: no subnet is trained after the supernet.
- **nas+ft**: each of those subnets fine-tuned ``--epochs`` epochs (a normal fine-tune) before quantization; all of
  them together train fewer epochs than the width searches' results (3 x ``--epochs`` each).
- **knapsack** / **uniform**: ``auto_prune`` at the same budget (``bench.search``'s cell), then ``recalibrate_bn``,
  ``finetune`` for 3 x ``--epochs`` epochs (the supernet's whole training, for every result) and ``quantize``.

Every file is measured at the end, alternated with every other of its model (medians of ``--runs`` rounds; in each
round a file runs ``WARM_BLOCK`` times in a row and the first is not counted: single runs alternated among some 30
files find the caches holding the others' weights, which slows a small model more than a large one; VGG-small
pruned to a third of its latency ran 6-7 % slower among 30 sessions than beside one other, the whole model 3-5 %;
in blocks of 3, within 1.5 %), and scored on the digits test split in ORT.  Reported: the table, the Pareto front
of the NAS subnets, what the acceptance asks (``summary``) and a plot.  ``--report`` prints saved runs instead, one
table of every model in them (a model in a later file replaces the same model in an earlier one: a model rerun
alone with other budgets).
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

import torch

from fxcompress.passes.nas.lib import sandwich, subnet_search
from fxcompress.passes.nas.lib.elastic import ElasticSpace, Supernet, extract
from fxcompress.passes.nas.lib.subnet_latency import SubnetLatency, calibration_subnets, confirmed
from fxcompress.passes.pruning.lib import latency, latency_model
from fxcompress.passes.pruning.lib.channel_deps import ChannelGraph
from fxcompress.passes.pruning.lib.width_space import WidthSpace, candidate_groups
from fxcompress.passes.pruning.select_channels import SCORERS
from fxcompress.passes.train.lib import training

from .. import golden
from ..api import compile as compile_model
from ..context import CompileContext
from ..errors import RecipeError, VerificationError
from ..export.onnx import export_onnx
from ..timing import cpu_model
from ..tracing import trace
from . import search
from .runner import onnx_outputs, ort_int8_model
from .search import BATCH, MODELS, THREADS, cell, latency_for, measure

BUDGETS = (0.33, 0.5, 0.8)  # fractions of ORT's INT8 latency of the unpruned model, for every method
NAS_BUDGETS = (0.2, 0.27, 0.4, 0.6, 0.7, 0.9)  # more, for the supernet's subnets alone
VAL_REDRAWS = 2  # subnets are scored on the validation images and 2 fresh hardenings of them (1,080 images)
SUPERNET = ("nas", "nas+ft")  # the methods whose results come from the one supernet
WIDTHS = (0.25, 0.5, 0.75, 1.0)
WARM_BLOCK = 3  # every file runs 3 times in a row per round of the alternated measurements, the first not counted


def _data(name: str, redraws: int = VAL_REDRAWS) -> dict[str, Any]:
    hard = name.endswith("-hard-digits")
    train_images, _ = golden.digits("train", hard)
    return {"calibration_data": [train_images[i:i + 64] for i in range(0, 512, 64)],
            "train_data": golden.DigitsTraining(hard=hard),
            "eval_fn": golden.accuracy(name, "val", redraws=redraws)}


def test_accuracy(name: str, path: Path) -> float:
    images, labels = golden.digits("test", name.endswith("-hard-digits"))
    return float((torch.from_numpy(onnx_outputs(path, images)).argmax(1) == labels).float().mean() * 100)


def supernet_rows(name: str, budgets_ms: list[float], epochs: int, work: Path, log: Callable[[str], None],
                  seed: int = 0, subnet_epochs: int = 0, val_redraws: int = VAL_REDRAWS) -> tuple[list[dict], dict]:
    """Train the supernet once, then a confirmed, extracted, quantized subnet per budget (ms); with
    ``subnet_epochs``, also each subnet fine-tuned that many epochs before quantization ("nas+ft")."""
    model, example = golden.load(name)
    data = _data(name, val_redraws)
    gm = trace(model, example, eval_mode=True)
    cg = ChannelGraph(gm)
    groups = candidate_groups(cg)
    space = ElasticSpace(WidthSpace(cg, SCORERS["l1"](cg, None, {}), latency.layer_shapes(gm), groups),
                         WIDTHS, latency.ALIGN)
    net = Supernet(gm, space)
    optimizer, lr, wd = MODELS[name]
    loop = training.Loop(epochs=epochs, lr=lr, optimizer=optimizer, weight_decay=wd, seed=seed)
    ctx = CompileContext(gm=gm, example_inputs=example, train_data=data["train_data"])
    start = time.perf_counter()
    trained = sandwich.train(ctx, net, loop)
    train_s = time.perf_counter() - start
    log(f"  supernet: {len(space.elastic)} elastic groups, {len(space.blocks)} skippable blocks, {epochs} epochs in "
        f"{train_s:.0f} s")
    scoring = [(torch.cat(data["calibration_data"]),)]
    quality = subnet_search.SubnetQuality(net, scoring, data["eval_fn"])
    timing = SubnetLatency(gm, space, latency_model.batched(example, BATCH), "ort-int8", THREADS)
    timing.measure(calibration_subnets(space, seed))
    timing.calibrate()
    rows = []
    for budget, target_ms in budgets_ms:
        start = time.perf_counter()
        smallest = next(t for s, t in timing.points if s == space.smallest())
        if smallest > target_ms / 1e3:
            log(f"  nas @ {budget}: below the smallest subnet's {smallest * 1e3:.3f} ms")
            continue
        subnet, info = confirmed(timing, quality, target_ms / 1e3,
                                 lambda p: subnet_search.evolution(p, population=24, generations=8),
                                 relative=False, seed=seed, known=quality.scored)
        quality.keep(subnet)
        small = extract(gm, space, subnet, example)
        found = {"val_fp32": quality.scored[subnet], "macs": space.macs(subnet),
                 "search_s": time.perf_counter() - start, "search_measured_ms": info["measured_ms"],
                 "budget_ms": target_ms, **space.describe(subnet)}
        variants = {"nas": []}
        if subnet_epochs:
            variants["nas+ft"] = [{"pass": "finetune", "epochs": subnet_epochs, "optimizer": optimizer, "lr": lr,
                                   "weight_decay": wd, "seed": seed}]
        for strategy, steps in variants.items():
            int8 = compile_model(small, example, [*steps, {"pass": "quantize", "activation_observer": "kl_tolerance"}],
                                 **{k: v for k, v in data.items() if k != "eval_fn"})
            path = export_onnx(int8.module, example, work / f"{name}-{strategy}-{budget}.onnx")
            rows.append({"model": name, "strategy": strategy, "budget": budget, "path": str(path),
                         "accuracy": test_accuracy(name, path), **found})
            log(f"  {strategy} @ {budget}: val {found['val_fp32']:.2f} % (the supernet's subnet, fp32), test INT8 "
                f"{rows[-1]['accuracy']:.2f} %, measured {info['measured_ms']:.3f} ms of {target_ms:.3f}, skipped "
                f"{len(subnet.skipped)} blocks, MACs {found['macs']:.3f}")
    return rows, {"train_s": train_s, "epochs": epochs, "epoch_loss": trained["epoch_loss"],
                  "fit_errors": [round(e, 4) for e in timing.errors()]}


def bench_model(name: str, strategies: list[str], epochs: int, budgets: tuple[float, ...], runs: int, work: Path,
                log: Callable[[str], None], nas_budgets: tuple[float, ...] = (),
                val_redraws: int = VAL_REDRAWS) -> dict[str, Any]:
    log(f"{name}: references ...")
    model, example = golden.load(name)
    fp32 = golden.accuracy(name)(model)
    ort_path = work / f"{name}-ort-int8.onnx"
    ort = ort_int8_model(name, ort_path)
    ours = compile_model(model, example, [{"pass": "quantize", "activation_observer": "kl_tolerance"}],
                         calibration_data=_data(name)["calibration_data"])
    ours_path = export_onnx(ours.module, example, work / f"{name}-int8.onnx")
    start_ms = measure({"ORT INT8": str(ort_path), "int8": str(ours_path)}, runs, WARM_BLOCK)
    budgets_ms = [(b, b * start_ms["ORT INT8"]) for b in budgets]
    everything = sorted({*budgets, *nas_budgets})
    log(f"  ORT INT8 {start_ms['ORT INT8']:.3f} ms, ours {start_ms['int8']:.3f} ms; budgets {everything}")
    rows, nas = supernet_rows(name, [(b, b * start_ms["ORT INT8"]) for b in everything], 3 * epochs, work, log,
                              subnet_epochs=epochs, val_redraws=val_redraws)
    refused, failed = [], []
    for b, ms in budgets_ms:
        fraction = round(ms / start_ms["int8"], 3)  # the width search's budget: a fraction of our unpruned INT8
        for s in strategies:
            try:
                row = cell(name, s, fraction, 3 * epochs, work, log)
                rows.append({**row, "budget": b, "budget_ms": ms})
            except RecipeError as exc:  # below the width floor
                refused.append({"strategy": s, "budget": b, "reason": str(exc).splitlines()[0]})
                log(f"  {s} @ {b}: refused: {refused[-1]['reason'][:160]}")
            except VerificationError as exc:
                failed.append({"strategy": s, "budget": b, "reason": str(exc).splitlines()[0]})
                log(f"  {s} @ {b}: failed: {failed[-1]['reason']}")
    paths = {"ORT INT8": str(ort_path), "int8": str(ours_path),
             **{f"{r['strategy']}@{r['budget']}": r["path"] for r in rows}}
    ms = measure(paths, runs, WARM_BLOCK)
    for r in rows:
        r["ms"] = ms[f"{r['strategy']}@{r['budget']}"]
        r["vs_ort"] = r["ms"] / ms["ORT INT8"]
        r["within_budget"] = r["vs_ort"] <= r["budget"] * 1.05
        del r["path"]
    return {"model": name, "fp32": fp32, "ort_int8": {"accuracy": ort["accuracy"], "ms": ms["ORT INT8"]},
            "int8_ms": ms["int8"], "budgets": list(budgets), "nas_budgets": list(nas_budgets), "nas": nas,
            "rows": rows, "refused": refused,
            "failed": failed}


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row beats in both latency and accuracy, fastest first."""
    front = []
    for r in sorted(rows, key=lambda r: (r["ms"], -r["accuracy"])):
        if not front or r["accuracy"] > front[-1]["accuracy"]:
            front.append(r)
    return front


def summary(report: dict[str, Any]) -> list[str]:
    lines = []
    for m in report["models"]:
        nas = [r for r in m["rows"] if r["strategy"] == "nas"]
        front = pareto(nas)
        lines.append(f"{m['model']}: {len(nas)} NAS subnets from one supernet training ({m['nas']['epochs']} epochs, "
                     f"{m['nas']['train_s']:.0f} s), {len(front)} on their Pareto front, "
                     f"{sum(r['within_budget'] for r in nas)} within their budget (+5 %)")
        good = [r for r in m["rows"] if r["accuracy"] >= m["fp32"] - 1.0]
        for strategy in dict.fromkeys(r["strategy"] for r in m["rows"]):
            mine = [r for r in good if r["strategy"] == strategy]
            if mine:
                best = min(mine, key=lambda r: r["ms"])
                lines.append(f"  {strategy}: fastest within 1 point of fp32 ({m['fp32']:.2f} %): {best['ms']:.3f} ms "
                             f"= {1 / best['vs_ort']:.2f}x faster than ORT INT8 ({best['accuracy']:.2f} %)")
            else:
                lines.append(f"  {strategy}: no result within 1 point of fp32 ({m['fp32']:.2f} %)")
        for kind in SUPERNET:
            mine = [r for r in m["rows"] if r["strategy"] == kind]
            for r in (o for o in m["rows"] if o["strategy"] not in SUPERNET) if mine else ():
                faster = [o for o in mine if o["ms"] <= r["ms"]]
                head = f"  {r['strategy']}@{r['budget']} ({r['accuracy']:.2f} % at {r['ms']:.3f} ms) against {kind}: "
                if faster:
                    best = max(faster, key=lambda o: (o["accuracy"], -o["ms"]))
                    head += (f"its best subnet as fast or faster {best['accuracy']:.2f} % at {best['ms']:.3f} ms, "
                             f"{best['accuracy'] - r['accuracy']:+.2f} points")
                else:
                    head += "no subnet as fast"
                ms = latency_for(mine, r["accuracy"])
                lines.append(head + (f"; reaches {r['accuracy']:.2f} % at {ms:.3f} ms, {(1 - ms / r['ms']) * 100:+.1f} "
                                     f"% time saved" if ms is not None else "; never as accurate"))
        for x in m["refused"]:
            lines.append(f"  {x['strategy']}@{x['budget']} refused: {x['reason'][:200]}")
    return lines


def format_table(report: dict[str, Any]) -> str:
    """``search.format_table``, the supernet's results first, each method's from its widest budget down."""
    return search.format_table(report, lambda r: (r["strategy"] not in SUPERNET, r["strategy"], -r["budget"]),
                               method="method", budget="budget (x ORT INT8)")


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report of the models of several saved runs, a model in a later run replacing the same model in an
    earlier one; the runs must share their epochs (every comparison depends on them)."""
    epochs = {r["epochs"] for r in reports}
    if len(epochs) > 1:
        raise ValueError(f"the reports were made with different --epochs ({sorted(epochs)}); their methods are not "
                         f"comparable in one table: merge runs made with the same --epochs")
    models: dict[str, dict[str, Any]] = {}
    for r in reports:
        models.update({m["model"]: m for m in r["models"]})
    return {"cpu": " / ".join(dict.fromkeys(r["cpu"] for r in reports)), "epochs": epochs.pop(),
            "models": list(models.values()), "runs": len(reports),
            "seconds": sum(r.get("seconds", math.nan) for r in reports)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m fxcompress.bench.nas", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20-hard-digits", "vgg-small-hard-digits"])
    parser.add_argument("--strategies", nargs="+", default=["knapsack", "uniform"])
    parser.add_argument("--epochs", type=int, default=10,
                        help="a normal fine-tune's epochs: the supernet trains 3x, every width-search result too")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS),
                        help="fractions of ORT's INT8 latency of the unpruned model, for every method")
    parser.add_argument("--nas-budgets", type=float, nargs="*", default=list(NAS_BUDGETS),
                        help="more budgets for the supernet's subnets alone")
    parser.add_argument("--runs", type=int, default=100, help="alternated latency runs (default 100)")
    parser.add_argument("--val-redraws", type=int, default=VAL_REDRAWS,
                        help=f"fresh hardenings of the validation images that score subnets (default {VAL_REDRAWS})")
    parser.add_argument("--json", metavar="OUT.json")
    parser.add_argument("--plot", metavar="OUT.png")
    parser.add_argument("--report", metavar="IN.json", nargs="+",
                        help="print saved --json reports instead of running (a model in a later file replaces the "
                             "same model in an earlier one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.report:
        try:
            report = merge_reports([json.loads(Path(p).read_text()) for p in args.report])
        except ValueError as exc:
            parser.error(str(exc))
    else:
        report = {"cpu": cpu_model(), "epochs": args.epochs, "val_redraws": args.val_redraws, "models": []}
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="fxcompress-nas-") as tmp:
            for name in args.models:
                report["models"].append(bench_model(name, args.strategies, args.epochs, tuple(args.budgets),
                                                    args.runs, Path(tmp),
                                                    lambda m: print(m, file=sys.stderr, flush=True),
                                                    tuple(args.nas_budgets), args.val_redraws))
                if args.json:
                    Path(args.json).write_text(json.dumps(report, indent=1))
        report["seconds"] = time.perf_counter() - start
    print(f"CPU: {report['cpu']}; a normal fine-tune {report['epochs']} epochs (the supernet and every width-search "
          f"result train 3x); {report.get('seconds', math.nan) / 60:.0f} min in all"
          + (f" ({report['runs']} runs)" if report.get("runs", 1) > 1 else ""))
    print(format_table(report))
    print("\n" + "\n".join(summary(report)))
    if args.json and not args.report:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        search.plot(report, args.plot, lambda m: (m["ort_int8"]["ms"] / 3, "3x faster than ORT INT8"))
    return report


if __name__ == "__main__":
    main()
