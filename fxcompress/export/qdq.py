"""QDQ ONNX as ONNX Runtime's fused integer kernels want it, from a fake-quantized GraphModule.

Before the export, ``widen_fake_quant`` rewrites fake-quant nodes whose integer range ONNX cannot express
(weights or activations below 8 bits) into 8-bit ones with the same values: a constant weight is fake-quantized
ahead of time (its values are then exactly on the 8-bit grid of the same scale), an activation is clamped to its
narrow range first.

After the export, ``finalize_qdq`` puts the model in the form ORT's own quantizer writes:

- a QuantizeLinear of a constant float weight becomes an int8 initializer feeding the DequantizeLinear (the file
  holds int8 weights; the values are those the fake-quant computed, rounding as PyTorch does: x * (1 / scale),
  half to even);
- the float bias of a Conv / ConvTranspose / Gemm whose input and weight are dequantized becomes an int32
  initializer with scale input scale x weight scale (zero point 0) behind a DequantizeLinear, which is what the
  QLinearConv / QGemm fusions require.  The biases the lowering rounded to that grid convert exactly.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
import torch.fx
from onnx import helper, numpy_helper

from .. import meta
from ..modules import bias_step

ONNX_RANGES = {(0, 255), (-128, 127), (0, 127)}  # integer ranges torch.onnx can express as QuantizeLinear
_FQ = (torch.fake_quantize_per_tensor_affine, torch.fake_quantize_per_channel_affine)


def _attr(gm: torch.fx.GraphModule, node) -> torch.Tensor:
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def widen_fake_quant(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose fake-quant nodes all use 8-bit integer ranges (the same values); or ``module``."""
    if not isinstance(module, torch.fx.GraphModule):
        return module
    narrow = [n for n in module.graph.nodes if n.op == "call_function" and n.target in _FQ
              and (n.args[-2], n.args[-1]) not in ONNX_RANGES]
    if not narrow:
        return module
    gm = copy.deepcopy(module)
    names = {n.name for n in narrow}
    for node in [n for n in gm.graph.nodes if n.name in names]:
        *rest, qmin, qmax = node.args
        wide = (-128, 127) if qmin < 0 else (0, 255)
        x = rest[0]
        if x.op == "get_attr":  # a constant: fake-quantize it now, on the same scale
            values = _fq_values(gm, node)
            buffer = f"_fxc_widened_{node.name}"
            gm.register_buffer(buffer, values)
            with gm.graph.inserting_before(node):
                const = gm.graph.get_attr(buffer)
            node.args = (const, *rest[1:], *wide)
            continue
        if node.target is torch.fake_quantize_per_tensor_affine:
            scale, zero = (float(_attr(gm, a)) if isinstance(a, torch.fx.Node) else a for a in rest[1:3])
            lo, hi = (qmin - zero) * scale, (qmax - zero) * scale
            with gm.graph.inserting_before(node):
                clamped = gm.graph.call_function(torch.clamp, (x, lo, hi))
            node.args = (clamped, scale, zero, *wide)
        else:
            raise ValueError(f"{node.name}: a per-channel fake-quant of a computed tensor below 8 bits cannot be "
                             f"exported to ONNX")
    meta.eliminate_dead_code(gm.graph)
    gm.recompile()
    return gm


def _fq_values(gm: torch.fx.GraphModule, node) -> torch.Tensor:
    args = [(_attr(gm, a) if isinstance(a, torch.fx.Node) else a) for a in node.args]
    with torch.no_grad():
        return node.target(*args).detach().clone()


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:  # the exporter's shared initializers
            values[node.output[0]] = values[node.input[0]]
    return values


def _quantize_like_torch(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    """round(x * (1 / scale)) + zero, half to even, saturated to zero's dtype: torch's fake-quant arithmetic."""
    info = np.iinfo(zero.dtype)
    if scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    inv = (np.float32(1.0) / scale.astype(np.float32)).astype(np.float32)
    q = np.rint((x.astype(np.float32) * inv).astype(np.float32)) + zero.astype(np.float64)
    return np.clip(q, info.min, info.max).astype(zero.dtype)


def finalize_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant weights quantized into int8 initializers, biases into int32 (see the module docstring)."""
    graph = model.graph
    consts = _constants(graph)
    inits = {i.name: i for i in graph.initializer}
    replaced: set[str] = set()  # float initializers whose consumers now read a quantized one
    rename: dict[str, str] = {}
    made: dict[str, np.ndarray] = {}  # quantized initializers written, by name
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits or len(node.input) < 3:
            continue
        if node.input[1] not in consts or node.input[2] not in consts:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        q = _quantize_like_torch(consts[node.input[0]], consts[node.input[1]], consts[node.input[2]], axis)
        name = node.input[0] + "_quantized"
        k = 1
        while name in made and not np.array_equal(made[name], q):  # a weight quantized twice, differently
            name, k = f"{node.input[0]}_quantized_{k}", k + 1
        if name not in made:
            made[name] = q
            graph.initializer.append(numpy_helper.from_array(q, name))
        rename[node.output[0]] = name
        replaced.add(node.input[0])
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
    for i in reversed(range(len(graph.node))):
        if graph.node[i].output[0] in rename:
            del graph.node[i]
    replaced |= _quantize_biases(graph, consts, {o: n for n in graph.node for o in n.output})
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name in replaced and i.name not in used]:
        graph.initializer.remove(init)
    return model


def _dq_scale(node: onnx.NodeProto | None, consts: dict[str, np.ndarray]) -> np.ndarray | None:
    if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in consts:
        return None
    return consts[node.input[1]].astype(np.float32)


def _quantize_biases(graph: onnx.GraphProto, consts: dict[str, np.ndarray], producer: dict) -> set[str]:
    """Float biases of Conv/ConvTranspose/Gemm with dequantized input and weight -> int32 + DequantizeLinear;
    returns the names of the float biases replaced."""
    new_nodes, replaced = [], set()
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        bias_name = node.input[2]
        if bias_name not in consts or bias_name in producer and producer[bias_name].op_type != "Constant":
            continue
        sx = _dq_scale(producer.get(node.input[0]), consts)
        sw = _dq_scale(producer.get(node.input[1]), consts)
        if sx is None or sw is None or sx.size != 1:
            continue
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i == 0 for a in node.attribute) and sw.size > 1:
            continue  # per-channel scales then lie along the other axis of B
        bias = consts[bias_name].astype(np.float32)
        step = bias_step(torch.from_numpy(sx.reshape(())), torch.from_numpy(sw)).numpy()
        if step.size not in (1, bias.size):
            continue
        q = np.rint(bias / step).astype(np.int64)
        if np.abs(q).max(initial=0) >= 2 ** 31 - 1:
            continue
        base = f"{bias_name}_{node.name or node.output[0]}"
        graph.initializer.extend([
            numpy_helper.from_array(q.astype(np.int32), base + "_int32"),
            numpy_helper.from_array(step.reshape(-1) if step.size > 1 else step.reshape(()), base + "_scale"),
            numpy_helper.from_array(np.zeros(step.shape if step.size > 1 else (), np.int32), base + "_zero"),
        ])
        dq = helper.make_node("DequantizeLinear", [base + "_int32", base + "_scale", base + "_zero"],
                              [base + "_dequantized"], name=base + "_DequantizeLinear", axis=0)
        new_nodes.append((node, dq))
        node.input[2] = base + "_dequantized"
        replaced.add(bias_name)
    for node, dq in new_nodes:  # a node's inputs must be produced before it: insert each DQ just ahead
        index = list(graph.node).index(node)
        graph.node.insert(index, dq)
    return replaced
