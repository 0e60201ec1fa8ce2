"""Run exported models in ONNX Runtime and compare them with PyTorch."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch.utils import _pytree as pytree

from ..meta import side_effect_free
from ..tracing import normalize_inputs


def session(path: str | Path | bytes, *, threads: int = 1,
            optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            optimized_model_path: str | Path | None = None, spinning: bool = True,
            profile_prefix: str | Path | None = None) -> ort.InferenceSession:
    """A CPU InferenceSession over a model file (or its serialized bytes) with an explicit thread count (threads
    are set, never left to ORT's default).

    ``spinning=False`` stops idle worker threads from spin-waiting after a run: benchmarks that alternate several
    sessions need it, or the idle sessions' spinning threads take the cores from the one being timed.
    ``profile_prefix``: ORT records its per-node profile to a file of that prefix (``end_profiling()`` names it).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = optimization
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def run(model: str | Path | ort.InferenceSession, inputs: Any, *, threads: int = 1) -> list[np.ndarray]:
    """Outputs of the ONNX model on ``inputs`` (tensors or arrays, in the forward's order)."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model, threads=threads)
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = (inputs,)
    arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in inputs]
    feed = {i.name: a for i, a in zip(sess.get_inputs(), arrays)}
    return sess.run(None, feed)


def max_abs_diff(module: torch.nn.Module, onnx_path: str | Path, inputs: Sequence[torch.Tensor] | torch.Tensor) -> float:
    """max |ORT - PyTorch| over all outputs of ``module`` and its ONNX export on ``inputs``."""
    inputs = normalize_inputs(inputs)
    with side_effect_free(module):
        expected = [t.detach().numpy() for t in pytree.tree_leaves(module.eval()(*inputs))]
    got = run(onnx_path, inputs)
    if len(got) != len(expected):
        return float("inf")
    return max((float(np.max(np.abs(g - e))) if e.size else 0.0) for g, e in zip(got, expected))


def optimized_op_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each op type ONNX Runtime's CPU graph optimizations leave in the model at ``path``
    (basic and extended levels: the QDQ fusions into QLinearConv / QGemm / QLinearMatMul, without the
    hardware-specific layout rewrites of the highest level)."""
    import collections
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="fxcompress-ort-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        session(path, optimization=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, optimized_model_path=out)
        model = onnx.load(str(out))
    return dict(collections.Counter(n.op_type for n in model.graph.node))
