"""Weight-shared layers stored compactly in an ONNX file: packed codes, the codebook, and a subgraph that rebuilds
the weight.

    before (what the exporter writes):  W (fp32 initializer) -> Conv
    after:  codes.b.packed (uint8, b x ceil(n/8): bit planes of the codes of every b-bit layer, concatenated)
            -> BitShift left, BitShift right (one bit each) -> Reshape, Slice (n codes' bits) -> Cast int64
            -> Mul 2^plane -> ReduceSum over planes: codes.b (n codes, once for all layers)
            -> Split: each layer's codes -> Gather(codebook: K x d fp32) -> Reshape to W's shape
            (-> Mul by its per-channel scale, a folded BatchNorm) (-> Transpose, where W was written transposed)
            -> Conv

The exporter folds ``codebook[codes]`` into a dense initializer; it is found by its content (equal to the layer's
rebuilt weight, or to its transpose, within float32 rounding of the last place: the exporter's constant folding may
round a product differently) and replaced.  The graph rebuilds the weight PyTorch computes, bit for bit; ONNX
Runtime's graph optimizer folds the subgraph into a constant when the session starts (the file is small, the
session's memory holds the fp32 weights).
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..errors import ExportError
from ..lowbit import LEAF_MODULES, index_bits

OPSET = 13  # ReduceSum with axes as an input


def codebook_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers whose weights the file stores as codes (``CodebookLayer``, ``LowBitLayer``), by name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LEAF_MODULES)}


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes (n integers < 2^bits) -> uint8 bits x ceil(n/8): plane p holds bit p of every code, 8 codes per byte,
    the first code in the least significant bit."""
    flat = np.asarray(codes, dtype=np.uint8).reshape(-1)
    planes = ((flat[None, :] >> np.arange(bits, dtype=np.uint8)[:, None]) & 1).astype(np.uint8)
    return np.packbits(planes, axis=1, bitorder="little")


def compact(model: onnx.ModelProto, layers: dict[str, torch.nn.Module]) -> onnx.ModelProto:
    """``model`` with every layer's dense weight initializer replaced by its codes, codebook and the rebuilding
    subgraph (see the module docstring); the codes of all layers of one bit width are packed and unpacked
    together."""
    graph = model.graph
    opset = next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), 0)
    if opset < OPSET:
        raise ExportError(f"weight-shared layers are rebuilt with opset {OPSET} operators; the file has opset {opset}. "
                          f"Export with opset >= {OPSET}.")
    inits = {i.name: i for i in graph.initializer}
    by_shape: dict[tuple, list[str]] = {}
    for name, init in inits.items():
        if init.data_type == onnx.TensorProto.FLOAT:
            by_shape.setdefault(tuple(init.dims), []).append(name)
    consts: dict[str, np.ndarray] = {"codebook.seven": np.array(7, np.uint8),
                                     "codebook.shifts": np.arange(7, -1, -1, dtype=np.uint8).reshape(1, 1, 8),
                                     "codebook.axis2": np.array([2], np.int64),
                                     "codebook.axis0": np.array([0], np.int64),
                                     "codebook.flat": np.array([0, -1], np.int64)}
    nodes, done = [], set()
    streams: dict[int, list[np.ndarray]] = {}  # bits -> the codes of its layers, in order
    for layer_name, layer in layers.items():
        codebook, codes, scale, dense = (None if t is None else t.detach() for t in layer.parts())
        dense = dense.float().numpy()
        target, transposed = _find(inits, by_shape, dense, done)
        if target is None:
            raise ExportError(f"cannot store {layer_name!r} compactly: no weight in the exported file equals its "
                              f"rebuilt weight {tuple(dense.shape)} (the exporter combined it with another constant). "
                              f"Keep the layer out of weight sharing (exclude it).")
        done.add(target)
        bits = index_bits(codebook.shape[0])
        codes = codes.numpy()
        stream = streams.setdefault(bits, [])
        stream.append(codes)
        p = layer_name or "layer"
        consts[f"{p}.codebook"] = codebook.float().numpy()
        shape = consts.setdefault(f"shape.{'x'.join(map(str, dense.shape))}", np.array(dense.shape, np.int64))
        steps = [("Gather", [f"{p}.codebook", f"codes.{bits}.{len(stream) - 1}"], {"axis": 0}),
                 ("Reshape", [None, f"shape.{'x'.join(map(str, shape))}"], {})]
        if scale is not None:
            consts[f"{p}.scale"] = scale.float().numpy().reshape(-1, *([1] * (dense.ndim - 1)))
            steps.append(("Mul", [None, f"{p}.scale"], {}))
        if transposed:
            steps.append(("Transpose", [None], {"perm": [1, 0]}))
        previous = None
        for i, (op, inputs, attrs) in enumerate(steps):
            inputs = [previous if x is None else x for x in inputs]
            previous = target if i == len(steps) - 1 else f"{p}.{i}"
            nodes.append(helper.make_node(op, inputs, [previous], **attrs))
    unpack = []
    for bits, stream in streams.items():
        codes = np.concatenate(stream)
        p = f"codes.{bits}"
        consts[f"{p}.packed"] = pack(codes, bits)
        consts[f"{p}.count"] = np.array([len(codes)], np.int64)
        consts[f"{p}.pow2"] = (2 ** np.arange(bits, dtype=np.int64)).reshape(bits, 1)
        unpack += [
            helper.make_node("Unsqueeze", [f"{p}.packed", "codebook.axis2"], [f"{p}.u"]),
            helper.make_node("BitShift", [f"{p}.u", "codebook.shifts"], [f"{p}.l"], direction="LEFT"),
            helper.make_node("BitShift", [f"{p}.l", "codebook.seven"], [f"{p}.b"], direction="RIGHT"),
            helper.make_node("Reshape", [f"{p}.b", "codebook.flat"], [f"{p}.r"]),
            helper.make_node("Slice", [f"{p}.r", "codebook.axis0", f"{p}.count", "codebook.one"], [f"{p}.s"]),
            helper.make_node("Cast", [f"{p}.s"], [f"{p}.i"], to=onnx.TensorProto.INT64),
            helper.make_node("Mul", [f"{p}.i", f"{p}.pow2"], [f"{p}.m"]),
            helper.make_node("ReduceSum", [f"{p}.m", "codebook.axis0"], [p], keepdims=0),
        ]
        if len(stream) > 1:  # one Split hands every layer its codes
            consts[f"{p}.sizes"] = np.array([len(c) for c in stream], np.int64)
            unpack.append(helper.make_node("Split", [p, f"{p}.sizes"], [f"{p}.{i}" for i in range(len(stream))],
                                           axis=0))
        else:
            unpack.append(helper.make_node("Identity", [p], [f"{p}.0"]))
    consts["codebook.one"] = np.array([1], np.int64)
    kept = [i for i in graph.initializer if i.name not in done]
    del graph.initializer[:]
    graph.initializer.extend(kept + [numpy_helper.from_array(v, k) for k, v in consts.items()])
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(unpack + nodes + old)
    _short_names(graph)
    return model


def _short_names(graph: onnx.GraphProto) -> None:
    """Intermediate values renamed v0, v1, ... and node names dropped: in a small model the exporter's
    descriptive names ("/module/layer1/layer1.0/conv1/Conv_output_0") weigh as much as a third of the codes."""
    keep = {v.name for v in (*graph.input, *graph.output)} | {i.name for i in graph.initializer}
    names: dict[str, str] = {}
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        for i, out in enumerate(node.output):
            if out and out not in keep:
                node.output[i] = names.setdefault(out, f"v{len(names)}")
        for i, x in enumerate(node.input):
            node.input[i] = names.get(x, x)
    for v in graph.value_info:
        v.name = names.get(v.name, v.name)


def _find(inits: dict, by_shape: dict, dense: np.ndarray, done: set) -> tuple[str | None, bool]:
    """The initializer equal to ``dense`` (False) or to its transpose (True), to float32 rounding: an exporter's
    constant folding may round a product differently from PyTorch in the last place."""
    options = [(dense, False)] + ([(dense.T, True)] if dense.ndim == 2 else [])
    for value, transposed in options:
        for name in by_shape.get(tuple(value.shape), []):
            if name not in done and np.allclose(numpy_helper.to_array(inits[name]), value, rtol=2 ** -22, atol=0):
                return name, transposed
    return None, False
