"""Measurements: latency with contenders alternated, and output quality against the fp32 model."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import numpy as np


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` prints it (``/proc/cpuinfo``), for the line every benchmark table carries:
    ONNX Runtime's integer kernels differ between Intel and AMD."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def alternated_latency(contenders: dict[str, Callable[[], object]], runs: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each contender.

    Every round calls each contender once, the starting contender rotating from round to round, so that drift of
    a shared machine (other tenants, frequency changes) falls on all contenders alike.
    """
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def sqnr_db(reference: np.ndarray, output: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``output`` against ``reference``, in dB."""
    noise = float(np.sum((reference.astype(np.float64) - output) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)


def top1(logits: np.ndarray) -> np.ndarray:
    """Class predictions; for dense outputs (N, C, H, W) one per pixel."""
    return logits.argmax(axis=1)


def quality(reference: np.ndarray, output: np.ndarray, labels: np.ndarray | None) -> dict[str, float | None]:
    """Accuracy (when labels are known), top-1 agreement with the reference and SQNR of the logits."""
    pred, ref_pred = top1(output), top1(reference)
    return {
        "accuracy": float(100.0 * np.mean(pred == labels)) if labels is not None else None,
        "agreement": float(100.0 * np.mean(pred == ref_pred)),
        "sqnr_db": sqnr_db(reference, output),
    }
