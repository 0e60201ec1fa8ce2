"""How well the latency model predicts whole models: ``python -m fxcompress.bench.latency``.

For each golden model, runtime, batch and thread count: the layer table is built (or read from the cache), the
predictor is calibrated on its calibration plans (the unpruned model, uniform shares, two random plans: see
``latency_model.calibration_plans``; in ONNX Runtime their layers are also profiled inside the model), and
``--plans`` other random width plans (each group's share of channels removed drawn uniformly in [0, 0.85), any
width) are pruned for real, lowered for the runtime and measured, all contenders alternated run by run in one
process.  The table reports the median and largest |predicted - measured| as a share of the measured latency, over
the random plans only, and the median of a prediction from the layer table alone (no layer profiled inside the
model) fitted to the same runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tabulate import tabulate

from fxcompress.passes.pruning.lib import latency, latency_model
from fxcompress.passes.pruning.lib.channel_deps import ChannelGraph
from fxcompress.passes.pruning.lib.width_space import WidthSpace, candidate_groups
from fxcompress.passes.pruning.select_channels import SCORERS

from .. import golden
from ..plans import graph_signature
from ..timing import cpu_model
from ..tracing import trace

MODELS = ["resnet20-hard-digits", "vgg-small-hard-digits", "mobilenetv2-hard-digits", "vit-tiny-digits"]


def check_model(name: str, runtimes: list[str], batches: list[int], threads: list[int], plans: int, runs: int,
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    model, example = golden.load(name)
    rows = []
    for batch in batches:
        inputs = latency_model.batched(example, batch)
        gm = trace(model, inputs, eval_mode=True)
        cg = ChannelGraph(gm)
        groups = candidate_groups(cg)
        shapes = latency.layer_shapes(gm)
        space = WidthSpace(cg, SCORERS["l1"](cg, None, {}), shapes, groups)
        calibration = latency_model.calibration_plans(space)
        checked = latency_model.random_plans(space, plans, seed=1)
        everything = {**calibration, **checked}
        start = time.perf_counter()
        modules = {key: latency_model.pruned(gm, inputs, latency_model.targets(space, removed, graph_signature(gm)))
                   for key, removed in everything.items()}
        log(f"{name} batch {batch}: {len(modules)} plans pruned in {time.perf_counter() - start:.1f} s")
        for runtime in runtimes:
            start = time.perf_counter()
            prepared = {key: latency_model.prepared(m, runtime, inputs) for key, m in modules.items()}
            log(f"  {runtime}: lowered and exported in {time.perf_counter() - start:.1f} s")
            for t in threads:
                start = time.perf_counter()
                table = latency.build_table(shapes.values(), runtime, t)
                table_seconds = time.perf_counter() - start
                measured = latency_model.measure(prepared, inputs, t, runs)
                plain = latency_model.Predictor(table, space, shapes)  # the table alone, for comparison
                predictor = latency_model.Predictor(table, space, shapes)
                profiled = latency_model.observe_plans(predictor, gm, inputs, calibration,
                                                       {tuple(v): prepared[k] for k, v in calibration.items()}, t)
                for p in (plain, predictor):
                    p.calibrate([(calibration[k], measured[k]) for k in calibration])
                errors = [abs(predictor.seconds(checked[k]) - measured[k]) / measured[k] for k in checked]
                table_errors = [abs(plain.seconds(checked[k]) - measured[k]) / measured[k] for k in checked]
                row = {"model": name, "runtime": runtime, "batch": batch, "threads": t,
                       "full_ms": measured["full"] * 1e3, "median_error": statistics.median(errors),
                       "max_error": max(errors), "table_s": table_seconds, "profiled_layers": profiled,
                       "table_only_median_error": statistics.median(table_errors),
                       "fit": {"a": predictor.scale, "c_ms": predictor.const * 1e3,
                               "v_ms": predictor.per_volume * 1e3},
                       "plans": {k: {"measured_ms": measured[k] * 1e3,
                                     "predicted_ms": predictor.seconds(checked[k]) * 1e3} for k in checked}}
                log(f"    {t} thread(s): median error {row['median_error'] * 100:.1f} %, max "
                    f"{row['max_error'] * 100:.1f} %, table alone {row['table_only_median_error'] * 100:.1f} % "
                    f"(table {table_seconds:.1f} s)")
                rows.append(row)
    return rows


def format_table(report: dict[str, Any]) -> str:
    rows = [[r["model"], r["runtime"], r["batch"], r["threads"], f"{r['full_ms']:.3f}",
             f"{r['median_error'] * 100:.1f} %", f"{r['max_error'] * 100:.1f} %",
             f"{r['table_only_median_error'] * 100:.1f} %" if "table_only_median_error" in r else "-",
             r.get("profiled_layers", "-")] for r in report["rows"]]
    pooled = statistics.median(e for r in report["rows"] for e in
                               (abs(p["predicted_ms"] - p["measured_ms"]) / p["measured_ms"]
                                for p in r["plans"].values()))
    text = tabulate(rows, headers=["model", "runtime", "batch", "threads", "unpruned ms", "median |error|",
                                   "max |error|", "table alone", "layers profiled"], tablefmt="github")
    return f"{text}\n\nall plans pooled: median |error| {pooled * 100:.1f} %  (CPU: {report['cpu']})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fxcompress.bench.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runtimes", default="ort-int8,ort-fp32")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--plans", type=int, default=20, help="random width plans checked per cell (default 20)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per plan (default 30)")
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args(argv)

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]
    rows = []
    for name in args.models.split(","):
        rows += check_model(name, args.runtimes.split(","), ints(args.batches), ints(args.threads), args.plans,
                            args.runs, lambda m: print(m, file=sys.stderr, flush=True))
    report = {"cpu": cpu_model(), "rows": rows}
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
