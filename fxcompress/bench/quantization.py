"""Quantization quality on the trained golden models: fxcompress against ONNX Runtime's ``quantize_static``.

    python -m fxcompress.bench.quantization [--models NAME ...] [--json OUT.json]

For every trained ``-digits`` golden model, on its test split, all outputs computed by ONNX Runtime from the
exported files:

- fp32 accuracy;
- ORT ``quantize_static`` (QDQ, per-channel, U8S8) with MinMax, Entropy and Percentile calibration on the same 128
  training images: the best of them by logit SQNR;
- fxcompress ``quantize`` alone (it folds BatchNorm first) with ``kl_tolerance`` and ``minmax`` activations at W8A8,
  and at W6A8 and W4A8 (ORT has no such mode: our own minmax at that width is the comparison);
- how far ORT's INT8 output of our export is from our PyTorch simulation, in output steps (the logits' range on
  the test split / 255).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

import fxcompress as fxc
from fxcompress.export.ort import run
from fxcompress.golden_models import GOLDEN

from .measure import cpu_model, sqnr_db
from .ort_int8 import quantize as ort_quantize

ORT_METHODS = ("MinMax", "Entropy", "Percentile")
OURS = {  # column -> (activation_observer, weight_bits)
    "W8A8 kl_tol": ("kl_tolerance", 8), "W8A8 minmax": ("minmax", 8),
    "W6A8 kl_tol": ("kl_tolerance", 6), "W6A8 minmax": ("minmax", 6),
    "W4A8 kl_tol": ("kl_tolerance", 4), "W4A8 minmax": ("minmax", 4),
}


def _quality(reference: np.ndarray, output: np.ndarray, labels: np.ndarray) -> dict:
    return {"sqnr_db": sqnr_db(reference, output), "accuracy": 100.0 * float(np.mean(output.argmax(1) == labels))}


def evaluate(name: str, work: Path, samples: int = 128) -> dict:

    hard = GOLDEN[name].hard
    model, example = fxc.golden.load(name)
    train, _ = fxc.golden.digits("train", hard=hard)
    images, labels = fxc.golden.digits("test", hard=hard)
    labels = labels.numpy()
    calib = train[:samples]
    fp32 = fxc.export_onnx(model, example, work / f"{name}.onnx")
    reference = run(fp32, images)[0]
    row: dict = {"model": name, "fp32": _quality(reference, reference, labels)}
    np.save(work / "calib.npy", calib.numpy())
    ort = {}
    for method in ORT_METHODS:
        out = work / f"{name}_ort_{method}.onnx"
        with contextlib.redirect_stdout(sys.stderr):  # ORT's calibrators print progress; the table goes to stdout
            job = ort_quantize(str(fp32), str(work / "calib.npy"), str(out), method)
        ort[method] = _quality(reference, run(out, images)[0], labels) | {"seconds": job["seconds"]}
    best = max(ort, key=lambda m: ort[m]["sqnr_db"])
    row["ort"], row["ort_best"] = ort, best
    step = float(reference.max() - reference.min()) / 255
    for column, (observer, bits) in OURS.items():
        result = fxc.compile(model, example, [{"pass": "quantize", "weight_bits": bits,
                                               "activation_observer": observer}],
                             calibration_data=[calib[i:i + 1] for i in range(samples)])
        path = result.export_onnx(work / f"{name}_{column.replace(' ', '_')}.onnx")
        got = run(path, images)[0]
        with torch.no_grad():
            sim = result.module(images).numpy()
        calibrate = next(r for r in result.history if r.name == "calibrate")
        row[column] = _quality(reference, got, labels) | {
            "ort_vs_simulation_steps": float(np.abs(got - sim).max()) / step, "calibrate_seconds": calibrate.seconds}
    return row


def format_table(rows: list[dict]) -> str:
    headers = ["model", "fp32 %", "best ORT INT8 (SQNR dB / %)", *[f"{c} (dB / %)" for c in OURS],
               "ORT vs sim. (steps)"]
    body = []
    for r in rows:
        best = r["ort"][r["ort_best"]]
        cells = [f"{r[c]['sqnr_db']:.1f} / {r[c]['accuracy']:.2f}" for c in OURS]
        body.append([r["model"], f"{r['fp32']['accuracy']:.2f}",
                     f"{r['ort_best']}: {best['sqnr_db']:.1f} / {best['accuracy']:.2f}", *cells,
                     f"{r['W8A8 kl_tol']['ort_vs_simulation_steps']:.2f}"])
    return tabulate(body, headers=headers, tablefmt="github")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [n for n in fxc.golden.names() if n.endswith("-digits")]
    parser.add_argument("--models", nargs="+", default=names, choices=names)
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fxcompress-quant-") as tmp:
        for name in args.models:
            print(f"{name} ...", file=sys.stderr)
            rows.append(evaluate(name, Path(tmp)))
    print(f"CPU: {cpu_model()}")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
