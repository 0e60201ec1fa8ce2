"""Weight sharing and extreme low bit widths on the trained golden models: what each costs in ONNX Runtime.

    python -m fxcompress.bench.weight_share [--models ...] [--binary-epochs 15] [--runs 100] [--json OUT]

For each model and variant: the ONNX file's size (and how many times smaller than fp32's), the SQNR of its logits
against the fp32 model's on the digits test split, its test accuracy (run in ONNX Runtime), its latency (batch 8,
1 thread, every file of the model alternated, medians of ``--runs``), the memory its session takes (resident
memory added by creating the session and running it once, in a fresh process) and the largest difference between
ONNX Runtime and the PyTorch module it was exported from.

Variants (BatchNorm folded before export wherever it folds):
- **fp32**, **int8** (our static QDQ, kl_tolerance);
- **uniform 4-bit**: every Conv/Linear weight rounded to nearest on a symmetric per-channel 4-bit grid (weight-only),
  stored as 4-bit codes;
- **kmeans b-bit** and **kmeans b-bit data-aware** (b = 2, 3, 4; ``weight_share``), each also after one epoch of
  centroid fine-tuning (``+ ft``: Adam at 1e-4; a centroid's gradient is the sum over its cluster, thousands of
  weights, which the models' own SGD rate turns into steps that diverge at 2 bits);
- **pq b-bit x 4**: product quantization, 2^b codewords of 4 weights (b/4 index bits per weight; b = 5 and 7),
  data-aware, the first layer (27 weights per row) kept float, + one epoch of fine-tuning;
- **kmeans 4-bit -> INT8**: the fine-tuned data-aware 4-bit model quantized (``quantize``): its shared weights land
  on the per-channel INT8 grid and run as INT8 kernels (the fast variant);
- **ternary**, **binary**, **xnor** (binary inputs too): ``binarize`` (first and last layers at 8 bits) then
  ``distill`` from the fp32 model for ``--binary-epochs`` epochs (Adam, lr 1e-3).

Reported beside the table: what the acceptance of the weight-sharing work asks (``summary``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tabulate import tabulate

from fxcompress.passes.quant.weight_share import candidates

from .. import golden
from ..api import compile as compile_model
from ..export.onnx import export_onnx
from ..instruments import sqnr_db
from ..lowbit import LowBitLayer
from ..timing import cpu_model
from ..tracing import trace
from .runner import onnx_outputs
from .search import measure

MODELS_DEFAULT = ("resnet20-hard-digits", "vgg-small-hard-digits")
PQ_BITS = (5, 7)  # 32 and 128 codewords of 4 weights: ResNet-20's small layers pay for 128 in codebook bytes
BINARY_LR = 1e-3


FT = {"pass": "finetune", "epochs": 1, "optimizer": "adam", "lr": 1e-4, "seed": 0}  # centroid fine-tuning


def variants(name: str, first_layer: str, binary_epochs: int) -> dict[str, list[dict[str, Any]] | str]:
    """Variant name -> recipe (a list of passes), or "uniform4" (built here: no pass rounds to a 4-bit grid alone)."""
    out: dict[str, list[dict[str, Any]] | str] = {"fp32": [], "int8": [{"pass": "quantize",
                                                                        "activation_observer": "kl_tolerance"}],
                                                  "uniform 4-bit": "uniform4"}
    for aware in (False, True):
        for bits in (2, 3, 4):
            label = f"kmeans {bits}-bit" + (" data-aware" if aware else "")
            share = {"pass": "weight_share", "bits": bits, "data_aware": aware}
            out[label] = [share]
            out[label + " + ft"] = [share, FT]
    for bits in PQ_BITS:
        pq = {"pass": "weight_share", "method": "pq", "bits": bits, "block_size": 4, "data_aware": True,
              "exclude": first_layer}
        out[f"pq {bits}-bit x 4"] = [pq]
        out[f"pq {bits}-bit x 4 + ft"] = [pq, FT]
    out["kmeans 4-bit -> INT8"] = [{"pass": "weight_share", "bits": 4, "data_aware": True}, FT,
                                   {"pass": "quantize", "activation_observer": "kl_tolerance"}]
    distill = {"pass": "distill", "epochs": binary_epochs, "optimizer": "adam", "lr": BINARY_LR, "seed": 0}
    out["ternary"] = [{"pass": "binarize", "weights": "ternary"}, distill]
    out["binary"] = [{"pass": "binarize", "weights": "binary"}, distill]
    out["xnor"] = [{"pass": "binarize", "weights": "binary", "activations": "binary"}, distill]
    return out


def uniform4(model: torch.nn.Module, example: tuple) -> torch.nn.Module:
    """Every Conv/Linear weight on its symmetric per-channel 4-bit grid, rounded to nearest."""
    gm = trace(model, example, eval_mode=True)
    for layer in candidates(gm)[0]:
        parent, _, leaf = layer.rpartition(".")
        setattr(gm.get_submodule(parent), leaf, LowBitLayer(gm.get_submodule(layer), "int4").eval())
    return gm


def session_mb(path: Path) -> float:
    """Resident memory (MB) that creating an ONNX Runtime session of ``path`` and one run add, in a fresh process."""
    code = ("import sys, numpy as np, onnxruntime as ort\n"
            "def rss():\n"
            "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS'))\n"
            "o = ort.SessionOptions(); o.intra_op_num_threads = 1\n"
            "before = rss(); s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n"
            "i = s.get_inputs()[0]; s.run(None, {i.name: np.zeros([8, *i.shape[1:]], np.float32)})\n"
            "print((rss() - before) / 1024)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def bench_model(name: str, binary_epochs: int, runs: int, work: Path, log: Callable[[str], None],
                only: list[str] | None = None) -> dict[str, Any]:
    model, example = golden.load(name)
    hard = name.endswith("-hard-digits")
    train_images, _ = golden.digits("train", hard)
    test_images, labels = golden.digits("test", hard)
    data = {"calibration_data": [train_images[i:i + 64] for i in range(0, 512, 64)],
            "train_data": golden.DigitsTraining(hard=hard)}
    with torch.no_grad():
        reference = model(test_images)
    first = candidates(trace(model, example, eval_mode=True))[0][0]
    rows, paths = [], {}
    for label, recipe in variants(name, first, binary_epochs).items():
        if only and label not in only:
            continue
        start = time.perf_counter()
        if recipe == "uniform4":
            module, stats = uniform4(model, example), {}
        else:
            result = compile_model(model, example, [*recipe, {"pass": "fold_bn"}] if recipe and
                                   recipe[-1]["pass"] != "quantize" else recipe, **data)
            module = result.module
            stats = {} if recipe[-1:] and recipe[-1]["pass"] == "quantize" else next(  # (INT8 files store 8 bits)
                (r.stats for r in result.history if r.name in ("weight_share", "binarize")), {})
        seconds = time.perf_counter() - start
        path = export_onnx(module, example, work / f"{name}-{label.replace(' ', '_')}.onnx")
        ort_logits = torch.from_numpy(onnx_outputs(path, test_images))
        with torch.no_grad():
            torch_logits = module(test_images)
        rows.append({"variant": label, "bytes": path.stat().st_size, "seconds": round(seconds, 1),
                     "accuracy": float((ort_logits.argmax(1) == labels).float().mean() * 100),
                     "logit_sqnr_db": round(sqnr_db(reference, ort_logits), 2),
                     "ort_vs_torch": float((ort_logits - torch_logits).abs().max()),
                     "bits_per_weight": stats.get("bits_per_weight_with_codebooks", stats.get("bits_per_weight")),
                     "memory_mb": round(session_mb(path), 1)})
        paths[label] = str(path)
        log(f"  {label}: {rows[-1]['accuracy']:.2f} %, {rows[-1]['logit_sqnr_db']:.1f} dB, "
            f"{rows[-1]['bytes'] / 1e3:.0f} kB, {seconds:.0f} s")
    ms = measure(paths, runs)
    fp32 = next(r for r in rows if r["variant"] == "fp32")
    for r in rows:
        r["ms"] = round(ms[r["variant"]], 4)
        r["smaller"] = round(fp32["bytes"] / r["bytes"], 2)
    return {"model": name, "rows": rows}


def summary(report: dict[str, Any]) -> list[str]:
    lines = []
    for m in report["models"]:
        by = {r["variant"]: r for r in m["rows"]}
        fp32, int8 = by["fp32"], by.get("int8")
        lines.append(f"{m['model']}: fp32 {fp32['accuracy']:.2f} %, {fp32['bytes'] / 1e3:.0f} kB, {fp32['ms']:.3f} ms")
        fours = [by[v] for v in ("kmeans 4-bit", "kmeans 4-bit + ft", "kmeans 4-bit data-aware",
                                 "kmeans 4-bit data-aware + ft") if v in by]
        if fours:
            k4 = max(fours, key=lambda r: r["accuracy"])
            lines.append(f"  4-bit k-means, at most one epoch of fine-tuning: best {k4['variant']}, "
                         f"{k4['accuracy']:.2f} % ({k4['accuracy'] - fp32['accuracy']:+.2f} points), "
                         f"{k4['smaller']:.2f}x smaller")
        uniform = by.get("uniform 4-bit")
        for v in ("kmeans 4-bit", "kmeans 4-bit data-aware"):
            if uniform and v in by:
                lines.append(f"  {v} before fine-tuning: {by[v]['logit_sqnr_db'] - uniform['logit_sqnr_db']:+.2f} dB "
                             f"logit SQNR over uniform 4-bit ({uniform['logit_sqnr_db']:.2f} dB)")
        for bits in (2, 3, 4):
            a, p = by.get(f"kmeans {bits}-bit data-aware"), by.get(f"kmeans {bits}-bit")
            if a and p:
                lines.append(f"  {bits}-bit: data-aware {a['logit_sqnr_db'] - p['logit_sqnr_db']:+.2f} dB over plain")
        for pq in (r for r in m["rows"] if r["variant"].startswith("pq") and r["variant"].endswith("+ ft")):
            lines.append(f"  {pq['variant']} (one epoch): {pq['accuracy']:.2f} % "
                         f"({pq['accuracy'] - fp32['accuracy']:+.2f}), {pq['smaller']:.2f}x smaller")
        for v in ("ternary", "binary", "xnor"):
            if v in by:
                lines.append(f"  {v}: {by[v]['accuracy']:.2f} % ({by[v]['accuracy'] - fp32['accuracy']:+.2f}), "
                             f"{by[v]['smaller']:.2f}x smaller")
        for r in m["rows"]:
            verdicts = [f"{_speed(r['ms'], ref['ms'])} {ref['variant']}" for ref in (fp32, int8) if ref is not None
                        and ref is not r]
            lines.append(f"  {r['variant']}: {r['ms']:.3f} ms, {', '.join(verdicts)}")
    return lines


def _speed(ms: float, reference: float, margin: float = 0.05) -> str:
    if ms < reference * (1 - margin):
        return f"faster ({reference / ms:.2f}x) than"
    if ms > reference * (1 + margin):
        return f"slower ({ms / reference:.2f}x) than"
    return "as fast as"


def format_table(report: dict[str, Any]) -> str:
    rows = [[m["model"], r["variant"], f"{r['bytes'] / 1e3:.0f}", f"{r['smaller']:.2f}",
             "" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.2f}", f"{r['logit_sqnr_db']:.1f}",
             f"{r['accuracy']:.2f}", f"{r['ms']:.3f}", f"{r['memory_mb']:.1f}", f"{r['ort_vs_torch']:.1e}"]
            for m in report["models"] for r in m["rows"]]
    return tabulate(rows, headers=["model", "variant", "file (kB)", "x smaller", "bits/weight", "logit SQNR (dB)",
                                   "accuracy (%)", "ORT ms", "session MB", "ORT - torch"], tablefmt="github")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m fxcompress.bench.weight_share",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS_DEFAULT))
    parser.add_argument("--variants", nargs="+", help="only these variants (names as in the table)")
    parser.add_argument("--binary-epochs", type=int, default=15, help="distillation epochs of the binarized models")
    parser.add_argument("--runs", type=int, default=100, help="alternated latency runs (default 100)")
    parser.add_argument("--json", metavar="OUT.json")
    parser.add_argument("--report", metavar="IN.json", help="print a saved --json report instead of running")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.report:
        report = json.loads(Path(args.report).read_text())
    else:
        report = {"cpu": cpu_model(), "binary_epochs": args.binary_epochs, "models": []}
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="fxcompress-ws-") as tmp:
            for name in args.models:
                print(f"{name} ...", file=sys.stderr, flush=True)
                report["models"].append(bench_model(name, args.binary_epochs, args.runs, Path(tmp),
                                                    lambda m: print(m, file=sys.stderr, flush=True), args.variants))
        report["seconds"] = round(time.perf_counter() - start)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"CPU: {report['cpu']}; binarized models distilled {report['binary_epochs']} epochs; "
          f"{report.get('seconds', 0) / 60:.0f} min in all")
    print(format_table(report))
    print("\n" + "\n".join(summary(report)))
    return report


if __name__ == "__main__":
    main()
