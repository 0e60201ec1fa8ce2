"""The benchmark against ONNX Runtime's own INT8 quantizer (``fxcompress bench MODEL``)."""
from .runner import BenchConfig, format_table, run_bench

__all__ = ["BenchConfig", "format_table", "run_bench"]
