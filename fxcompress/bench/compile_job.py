"""The fxcompress side of a benchmark, run as a script in its own process (like ORT's quantizer):

    python compile_job.py MODEL RECIPE CALIBRATION.npy OUT.onnx

compiles MODEL through RECIPE with the calibration samples (and, for a trained digits model, its training loader,
for recipes that train), exports OUT.onnx, and prints one JSON line: total seconds, the calibrate pass's seconds,
each pass's seconds, and peak RSS (with the RSS once the imports are done).
"""
import json
import sys
import time

import numpy as np
import torch

import fxcompress as fxc
from fxcompress.bench.ort_int8 import peak_mb
from fxcompress.golden import load_model, training_data


def compile_job(spec: str, recipe: str, calibration_npy: str, out_path: str) -> dict:
    base = peak_mb()
    model, example = load_model(spec)
    samples = torch.from_numpy(np.load(calibration_npy))
    train = training_data(spec)  # loaded before the clock starts, like the model and the calibration samples
    start = time.perf_counter()
    result = fxc.compile(model, example, recipe, calibration_data=[samples[i:i + 1] for i in range(len(samples))],
                         train_data=train)
    result.export_onnx(out_path)
    seconds = time.perf_counter() - start
    calibration = [r.seconds for r in result.history if r.name == "calibrate"]
    return {"seconds": seconds, "calibration_seconds": sum(calibration) if calibration else None,
            "peak_mb": peak_mb(), "base_mb": base, "passes": [[r.name, r.seconds] for r in result.history]}


if __name__ == "__main__":
    print(json.dumps(compile_job(*sys.argv[1:5])))
