"""``fxcompress bench MODEL``: fxcompress recipes side by side with ONNX Runtime's own INT8 quantizer.

Rows: fp32 PyTorch, fp32 ORT (our export of the untouched model, the file an ORT user starts from), ORT
``quantize_static`` INT8 with each calibrator, and one row per fxcompress recipe.  Columns: latency in ORT at
batch 1 and 8 with 1 and 2 threads (medians over alternated runs, and the ratio to the best ORT INT8 row, best by
logit SQNR), size on disk, calibration/compile time and peak memory (each in its own process), accuracy on the
digits test split for trained models, top-1 agreement with fp32 and SQNR of the logits.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch
from tabulate import tabulate

from fxcompress.golden_models import GOLDEN
from fxcompress.golden_models.digits import digits

from ..errors import FxCompressError
from ..export.onnx import export_onnx
from ..export.ort import session
from ..golden import load_model
from .measure import alternated_latency, quality
from .ort_int8 import METHODS

ORT_INT8 = "ORT INT8 "
_QUANTIZE = '[[passes]]\npass = "quantize"\nactivation_observer = "{}"\n'  # folds BatchNorm first
DEFAULT_RECIPES = {  # row name -> TOML recipe: the fxcompress rows of `fxcompress bench` without --recipe
    "fold_bn": '[[passes]]\npass = "fold_bn"\n',
    "int8": _QUANTIZE.format("kl_tolerance"),
    "int8-minmax": _QUANTIZE.format("minmax"),
}
HERE = Path(__file__).parent


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1, 8)
    threads: tuple[int, ...] = (1, 2)
    runs: int = 30
    warmup: int = 3
    calibration_samples: int = 128
    methods: tuple[str, ...] = tuple(METHODS)
    eval_samples: int = 64  # for models without a labelled test split

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(batches=(1,), threads=(1,), runs=10, warmup=2, calibration_samples=16, methods=("MinMax",),
                   eval_samples=8)


def _data(spec: str, example: torch.Tensor, config: BenchConfig):
    """(calibration samples, eval images, eval labels or None) for the model."""

    golden = GOLDEN.get(spec)
    if golden is not None and golden.trained:
        calib, _ = digits("train", golden.hard)
        images, labels = digits("test", golden.hard)
        return calib[:config.calibration_samples].numpy(), images, labels.numpy()
    g = torch.Generator().manual_seed(1234)
    calib = torch.randn((config.calibration_samples, *example.shape[1:]), generator=g)
    return calib.numpy(), torch.randn((config.eval_samples, *example.shape[1:]), generator=g), None


def run_job(script: Path, *args: str) -> dict:
    """Run a job script in a fresh Python process; its last line of output is the JSON result."""
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise FxCompressError(f"benchmark job {script.name} {' '.join(args[-1:])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ort_int8_accuracy(spec: str, method: str = "MinMax", samples: int = 128) -> dict:
    """The ORT ``quantize_static`` baseline of a trained digits model: its test accuracy and calibration time."""
    with tempfile.TemporaryDirectory(prefix="fxcompress-int8-") as tmp:
        return ort_int8_model(spec, Path(tmp) / "int8.onnx", method, samples)


def ort_int8_model(spec: str, out: Path, method: str = "MinMax", samples: int = 128) -> dict:
    """ORT's ``quantize_static`` of a trained digits model written to ``out``: its test accuracy and seconds."""
    model, (example,) = load_model(spec)
    config = dataclasses.replace(BenchConfig(), calibration_samples=samples)
    calib, images, labels = _data(spec, example, config)
    if labels is None:
        raise FxCompressError(f"{spec} has no labelled test split; the INT8 accuracy baseline is for -digits models.")
    with tempfile.TemporaryDirectory(prefix="fxcompress-int8-") as tmp:
        work = Path(tmp)
        np.save(work / "calib.npy", calib)
        fp32 = export_onnx(model, (example,), work / "fp32.onnx")
        job = _ort_int8(fp32, work / "calib.npy", Path(out), method)
        output = onnx_outputs(Path(out), images)
    return {"accuracy": float(100.0 * np.mean(output.argmax(1) == labels)), "seconds": job["seconds"]}


def _ort_int8(fp32: Path, calibration_npy: Path, out: Path, method: str) -> dict:
    return run_job(HERE / "ort_int8.py", str(fp32), str(calibration_npy), str(out), method)


def onnx_outputs(path: Path, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    """The model's outputs in ONNX Runtime (2 threads), in batches."""
    sess = session(path, threads=2)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i:i + batch].numpy()})[0] for i in range(0, len(images), batch)])


def run_bench(spec: str, recipes: list[str], config: BenchConfig, log: Callable[[str], None] = print) -> dict:
    with tempfile.TemporaryDirectory(prefix="fxcompress-bench-") as tmp:
        return _run_bench(spec, recipes, config, log, Path(tmp))


def _run_bench(spec: str, recipes: list[str], config: BenchConfig, log: Callable[[str], None], work: Path) -> dict:
    model, (example,) = load_model(spec)
    calib, images, labels = _data(spec, example, config)
    np.save(work / "calib.npy", calib)
    with torch.inference_mode():
        reference = np.concatenate([model(images[i:i + 64]).numpy() for i in range(0, len(images), 64)])
    rows: list[dict] = [{"name": "fp32 PyTorch", "path": None,
                         "size_mb": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6}]
    fp32 = export_onnx(model, (example,), work / "fp32.onnx")
    rows.append({"name": "fp32 ORT", "path": fp32})
    for method in config.methods:
        log(f"ORT quantize_static, {method} calibration on {len(calib)} samples ...")
        out = work / f"ort_{method}.onnx"
        rows.append({"name": ORT_INT8 + method, "path": out, **_ort_int8(fp32, work / "calib.npy", out, method)})
    for recipe in recipes:
        log(f"fxcompress {recipe} ...")
        out = work / f"fxc_{Path(recipe).stem}.onnx"
        rows.append({"name": f"fxcompress {Path(recipe).stem}", "path": out,
                     **run_job(HERE / "compile_job.py", spec, str(recipe), str(work / "calib.npy"), str(out))})
    for row in rows:
        output = reference if row["path"] is None else onnx_outputs(row["path"], images)
        row.update(quality(reference, output, labels))
        if row["path"] is not None:
            row["size_mb"] = row["path"].stat().st_size / 1e6
    _latency(model, images, rows, config, log)
    int8 = [r for r in rows if r["name"].startswith(ORT_INT8)]
    best = max(int8, key=lambda r: (r["sqnr_db"], r["agreement"]))["name"] if int8 else None
    for row in rows:
        del row["path"]  # the files go with the work directory
        if best is not None:
            ref = next(r for r in rows if r["name"] == best)["latency_ms"]
            row["ratio_to_ort_int8"] = {k: v / ref[k] for k, v in row["latency_ms"].items()}
    return {"model": spec, "best_ort_int8": best, "rows": rows, "config": dataclasses.asdict(config),
            "machine": {"cores": os.cpu_count(),
                        "processor": platform.processor() or platform.machine(),
                        "torch": torch.__version__, "onnxruntime": ort.__version__},
            "eval": "digits test split" if labels is not None else f"{len(images)} seeded random inputs"}


def _latency(model: torch.nn.Module, images: torch.Tensor, rows: list[dict], config: BenchConfig, log) -> None:
    threads_before = torch.get_num_threads()
    for row in rows:
        row["latency_ms"] = {}
    try:
        for threads in config.threads:
            torch.set_num_threads(threads)
            sessions = {r["name"]: session(r["path"], threads=threads, spinning=False)
                        for r in rows if r["path"] is not None}
            for batch in config.batches:
                x = images[:batch] if len(images) >= batch else images.repeat(batch // len(images) + 1, 1, 1, 1)[:batch]
                feed = x.numpy()
                contenders: dict[str, Callable[[], object]] = {}
                for r in rows:
                    if r["path"] is None:
                        contenders[r["name"]] = lambda: _torch_forward(model, x)
                    else:
                        sess = sessions[r["name"]]
                        name = sess.get_inputs()[0].name
                        contenders[r["name"]] = lambda sess=sess, name=name: sess.run(None, {name: feed})
                log(f"latency: batch {batch}, {threads} thread(s), {config.runs} alternated runs ...")
                medians = alternated_latency(contenders, config.runs, config.warmup)
                for r in rows:
                    r["latency_ms"][f"b{batch}_t{threads}"] = medians[r["name"]] * 1e3
    finally:
        torch.set_num_threads(threads_before)


def _torch_forward(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        model(x)


def format_table(report: dict) -> str:
    keys = list(report["rows"][0]["latency_ms"])
    headers = ["", *[f"ms b{k.split('_')[0][1:]} t{k.split('_')[1][1:]}" for k in keys],
               "size MB", "calib s", "total s", "peak MB", "accuracy %", "agree %", "SQNR dB"]
    body = []
    for r in report["rows"]:
        mark = " *" if r["name"] == report["best_ort_int8"] else ""
        ratios = r.get("ratio_to_ort_int8", {})
        lat = [f"{r['latency_ms'][k]:.2f}" + (f" ({ratios[k]:.2f}x)" if k in ratios else "") for k in keys]
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else ""
        calib = f"{r['calibration_seconds']:.1f}" if r.get("calibration_seconds") is not None else ""
        peak = f"{r['peak_mb'] - r['base_mb']:.0f}" if "peak_mb" in r else ""
        acc = f"{r['accuracy']:.2f}" if r["accuracy"] is not None else "-"
        sqnr = "inf" if r["sqnr_db"] == float("inf") else f"{r['sqnr_db']:.1f}"
        body.append([r["name"] + mark, *lat, f"{r['size_mb']:.2f}", calib, seconds, peak, acc, f"{r['agreement']:.1f}", sqnr])
    note = (f"{report['model']} on {report['eval']}; latency: median of {report['config']['runs']} alternated runs, "
            f"(ratio to the best ORT INT8 row, marked *); calib s: the calibrator alone (ORT: create_calibrator, "
            f"collect_data, compute_data; fxcompress: the calibrate pass); total s: calibration and quantization (ORT), "
            f"compile and export (fxcompress); peak MB: peak RSS of that process above "
            f"its imports.")
    passes = [f"{r['name']}: " + ", ".join(f"{n} {sec * 1e3:.1f} ms" for n, sec in r["passes"])
              for r in report["rows"] if r.get("passes")]
    return "\n".join([tabulate(body, headers=headers, tablefmt="simple"), note, *passes])
