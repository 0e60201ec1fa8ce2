"""Low-rank SVD on the trained golden models: size, MACs, latency and accuracy, plain and data-aware SVD.

    python -m fxcompress.bench.low_rank [--models NAME ...] [--runs N] [--json OUT.json]

For each model (default: the trained ViT-tiny and VGG-small), on the digits test split:

- fp32, then ``low_rank`` at ``energy`` 0.99, 0.95 and 0.9, and with ``target`` 0.8 and 0.7 of the model's MACs
  (ranks allocated across layers), plain SVD of the weights;
- data-aware SVD (whitened by the inputs' second moments from 256 training images) at the same per-layer ranks as
  each plain row (``ranks=``), so that the two differ only in the factors;
- params and MACs (fxcompress's counter), ORT fp32 latency of the exported model at batch 1 and 8 with 1 thread
  (median of alternated runs, all rows of a model in one rotation), accuracy and the logits' SQNR against fp32.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from tabulate import tabulate

import fxcompress as fxc
from fxcompress.export.ort import run, session
from fxcompress.golden_models import GOLDEN
from fxcompress.passes.low_rank.low_rank_svd import LowRankPlan

from .measure import alternated_latency, cpu_model, quality

SETTINGS = (("energy", 0.99), ("energy", 0.95), ("energy", 0.9), ("target", 0.8), ("target", 0.7))
MODELS = ("vit-tiny-digits", "vgg-small-digits")


def evaluate(name: str, work: Path, runs: int = 100, samples: int = 256) -> list[dict]:

    hard = GOLDEN[name].hard
    model, example = fxc.golden.load(name)
    train, _ = fxc.golden.digits("train", hard=hard)
    images, labels = fxc.golden.digits("test", hard=hard)
    calib = [train[i:i + 32] for i in range(0, samples, 32)]
    reference = run(fxc.export_onnx(model, example, work / f"{name}.onnx"), images)[0]
    base = fxc.compile(model, example, [])
    rows = [{"row": "fp32", "params": base.after.params, "macs": base.after.macs, "path": work / f"{name}.onnx"}]
    for option, value in SETTINGS:
        plain = fxc.compile(model, example, [{"pass": "low_rank", option: value}])
        ranks = {k: v.rank for k, v in plain.plans[LowRankPlan].layers.items()}
        aware = fxc.compile(model, example, [{"pass": "low_rank", "ranks": ranks, "data_aware": True}],
                            calibration_data=calib) if ranks else plain
        setting = f"energy {value}" if option == "energy" else f"MACs x{value}"
        for label, result in ((setting, plain), (f"{setting}, data-aware", aware)):
            path = result.export_onnx(work / f"{name}_{len(rows)}.onnx")
            rows.append({"row": label, "params": result.after.params, "macs": result.after.macs, "path": path,
                         "layers": len(ranks), "seconds": result.history[-1].seconds})
    for row in rows:
        row.update(quality(reference, run(row["path"], images)[0], labels.numpy()))
    for batch in (1, 8):
        feed = images[:batch].numpy()
        sessions = {r["row"]: session(r["path"], threads=1, spinning=False) for r in rows}
        contenders = {label: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for label, s in sessions.items()}
        medians = alternated_latency(contenders, runs)
        for row in rows:
            row[f"ms_b{batch}"] = medians[row["row"]] * 1e3
    for row in rows:
        row["model"] = name
        del row["path"]
    return rows


def format_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        fp32 = next(x for x in rows if x["model"] == r["model"] and x["row"] == "fp32")
        body.append([r["model"], r["row"], r.get("layers", ""), f"{r['params']:,}", f"{r['macs']:,}",
                     f"{r['macs'] / fp32['macs']:.2f}", f"{r['ms_b1']:.3f}", f"{r['ms_b8']:.3f}",
                     f"{r['accuracy']:.2f}", "inf" if r["sqnr_db"] == float("inf") else f"{r['sqnr_db']:.1f}"])
    return tabulate(body, headers=["model", "", "layers", "params", "MACs", "MACs / fp32", "ORT ms b1",
                                   "ORT ms b8", "accuracy %", "SQNR dB"], tablefmt="github")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        choices=[n for n in fxc.golden.names() if n.endswith("-digits")])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fxcompress-lowrank-") as tmp:
        for name in args.models:
            print(f"{name} ...", file=sys.stderr)
            rows += evaluate(name, Path(tmp), args.runs)
    print(f"CPU: {cpu_model()}")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
