"""ONNX export and ONNX Runtime helpers."""
from .onnx import export_onnx
from .ort import max_abs_diff, run, session

__all__ = ["export_onnx", "max_abs_diff", "run", "session"]
