"""The benchmark against ONNX Runtime's own INT8 quantizer (``fxcompress bench MODEL``)."""
from .runner import DEFAULT_RECIPES, BenchConfig, format_table, run_bench

__all__ = ["DEFAULT_RECIPES", "BenchConfig", "format_table", "run_bench"]
