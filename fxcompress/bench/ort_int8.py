"""ONNX Runtime's own INT8 quantizer, as a user would run it: ``quant_pre_process`` then ``quantize_static``
(QDQ, per-channel weights, uint8 activations / int8 weights), with MinMax, Entropy, Entropy with 2048 histogram
bins, and Percentile calibration.

``quantize_static`` does not pass a bin count to its Entropy calibrator (128 bins, which on the golden CNNs picks
the same ranges as MinMax).  Every variant runs the calibrator as ``quantize_static`` does (``create_calibrator``,
``collect_data``, ``compute_data``; with ``num_bins=2048`` for Entropy-2048), timed on its own, and hands the
ranges to ``quantize_static`` through its calibration cache, the path ORT provides for reusing computed ranges.

Each variant runs as this file's script in a fresh process that imports only onnx, onnxruntime and numpy, so that
its calibration time and peak memory are its own, as in a user's process.
"""
from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = {  # row label suffix -> (CalibrationMethod name, extra calibrator options or None)
    "MinMax": ("MinMax", None),
    "Entropy": ("Entropy", None),
    "Entropy-2048": ("Entropy", {"num_bins": 2048, "num_quantized_bins": 128}),
    "Percentile": ("Percentile", None),
}


def peak_mb() -> float:
    """This process's peak resident memory in MB.

    ``VmHWM`` belongs to the address space, which exec replaces; ``ru_maxrss`` would carry over the parent's peak
    (Linux keeps the larger of the two across fork and exec), hiding the job's own memory under the parent's.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # elsewhere: KiB on Linux, bytes on macOS


class _Reader:
    """A CalibrationDataReader over an .npy file of samples, one sample per call."""

    def __init__(self, path: Path, input_name: str):
        self.samples = np.load(path)
        self.input_name = input_name
        self.index = 0

    def get_next(self):
        if self.index >= len(self.samples):
            return None
        sample = self.samples[self.index:self.index + 1]
        self.index += 1
        return {self.input_name: sample}

    def rewind(self):
        self.index = 0

    def __len__(self):
        return len(self.samples)


def quantize(fp32_path: str, calibration_npy: str, out_path: str, method: str) -> dict:
    """Quantize ``fp32_path`` with ORT; {"seconds" (calibration and quantization), "calibration_seconds" (the
    calibrator alone), "peak_mb", "base_mb" (peak RSS once the imports are done),
    "pre_process" ("skip_symbolic_shape" where ORT's symbolic shape inference failed and was skipped)}."""
    import onnxruntime.quantization  # noqa: F401 - imported before the baseline, like a user's script

    base = peak_mb()
    with tempfile.TemporaryDirectory(prefix="ort-int8-") as tmp:
        seconds, calibration, pre_process = _quantize(Path(tmp), fp32_path, calibration_npy, out_path, method)
    return {"seconds": seconds, "calibration_seconds": calibration, "peak_mb": peak_mb(), "base_mb": base,
            "pre_process": pre_process}


def _quantize(work: Path, fp32_path: str, calibration_npy: str, out_path: str, method: str) -> tuple[float, float, str]:
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        create_calibrator,
        quantize_static,
    )
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "pre.onnx"
    pre_process = "default"
    try:
        quant_pre_process(fp32_path, str(pre))
    except Exception:  # noqa: BLE001 - ORT's symbolic shape inference fails on some attention graphs
        quant_pre_process(fp32_path, str(pre), skip_symbolic_shape=True)  # what its error leaves a user to do
        pre_process = "skip_symbolic_shape"
    input_name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
    reader = _Reader(Path(calibration_npy), input_name)
    calib_name, calib_options = METHODS[method]
    calibrate_method = getattr(CalibrationMethod, calib_name)
    options = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                   weight_type=QuantType.QInt8, calibrate_method=calibrate_method)
    # quantize_static runs exactly these steps when given a calibration cache path that does not exist yet
    # (create_calibrator, collect_data, compute_data); running them here times the calibrator on its own.
    op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    start = time.perf_counter()
    calibrator = create_calibrator(pre, op_types, augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=calibrate_method, extra_options=calib_options or {})
    calibrator.collect_data(reader)
    cache = work / "ranges.json"
    save_tensors_data(calibrator.compute_data(), cache)
    calibration = time.perf_counter() - start
    del calibrator
    quantize_static(str(pre), out_path, None, calibration_cache_path=str(cache), **options)
    return time.perf_counter() - start, calibration, pre_process


if __name__ == "__main__":  # run as a script, so that the process imports ONNX Runtime and nothing of ours
    import sys

    print(json.dumps(quantize(*sys.argv[1:5])))
