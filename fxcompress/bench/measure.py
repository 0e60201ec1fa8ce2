"""Measurements: latency with contenders alternated, and output quality against the fp32 model."""
from __future__ import annotations

import numpy as np

from ..timing import alternated_latency, cpu_model

__all__ = ["alternated_latency", "cpu_model", "sqnr_db", "top1", "quality"]


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
