"""Export a (compiled) module to ONNX with a dynamic batch axis, stable names and a checker pass.

Exporter choice.  We export with the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) first
and fall back to the ``torch.export``-based one (``dynamo=True``) when it fails:

- the TorchScript exporter turns ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` nodes of an
  FX GraphModule straight into QuantizeLinear/DequantizeLinear pairs, which is what our quantized models are, and it
  takes tens of milliseconds on small graphs;
- the ``torch.export`` path lowers ``torch.fake_quantize_*`` to ``aten.fake_quantize_*_cachemask`` (the autograd
  form) whenever a parameter requires grad or the batch axis is dynamic, and on torch 2.13 that op has no
  fake-tensor kernel, so the export fails.  Before that path we rewrite each fake-quant node of a copy of the graph
  into ``quantized_decomposed.quantize_*`` + ``dequantize_*``, which it translates to QuantizeLinear /
  DequantizeLinear with the same numbers.  It also takes seconds where the TorchScript exporter takes tens of ms;
- the TorchScript exporter is deprecated since torch 2.9, and some newer ops have no TorchScript symbolic: for
  those, and for the day it is removed, the ``torch.export`` path takes over;
- a file that fails ``onnx.checker`` counts as a failure of its exporter; last comes the ``torch.export`` path
  without its graph optimizer, which can drop a constant a node still reads (timm Gemma4's clamps on stored
  infinite bounds).

Names: inputs are named after the forward's arguments (the graph's placeholders), outputs ``output`` or
``output_0``, ``output_1``, ... in the flattened order of the output structure.  Axis 0 of every input is the
dynamic axis ``batch`` (and of every output whose axis 0 has the batch size in the example); so is every input axis
torch.export kept symbolic when it captured the module (``TraceInfo.dynamic_dims``: a sequence length), and every
output axis of such an axis's size in the example.
"""
from __future__ import annotations

import copy
import functools
import importlib
import inspect
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.fx
from torch.utils import _pytree as pytree

from .. import meta
from ..errors import ExportError
from ..fxutil import lookup
from ..lowbit import frozen_copy
from ..tracing import normalize_inputs, run_example
from .codebook import codebook_layers, compact
from .qdq import finalize_qdq, widen_fake_quant

log = logging.getLogger(__name__)

EXPORTERS = ("auto", "torchscript", "dynamo")


class _FlatOutputs(torch.nn.Module):
    """Returns the module's outputs as a flat tuple of tensors (ONNX has no nested outputs)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return tuple(pytree.tree_leaves(self.module(*args)))


def input_names(module: torch.nn.Module, count: int) -> list[str]:
    if isinstance(module, torch.fx.GraphModule):
        names = [n.target for n in module.graph.nodes if n.op == "placeholder"]
    else:
        names = [p.name for p in inspect.signature(module.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [n.lstrip("*") for n in names[:count]]
    return names + [f"input_{i}" for i in range(len(names), count)]


def output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _torchscript(wrapper, inputs, path, in_names, out_names, axes, opset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, inputs, str(path), dynamo=False, input_names=in_names, output_names=out_names,
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True)


_FAKE_QUANT = {  # fake-quant function -> its argument names, in order
    torch.fake_quantize_per_tensor_affine: ("input", "scale", "zero_point", "quant_min", "quant_max"),
    torch.fake_quantize_per_channel_affine: ("input", "scale", "zero_point", "axis", "quant_min", "quant_max"),
}


def decompose_fake_quant(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of a GraphModule with each fake-quant node as explicit quantize + dequantize (same numbers)."""
    if not isinstance(module, torch.fx.GraphModule) or not any(
            n.op == "call_function" and n.target in _FAKE_QUANT for n in module.graph.nodes):
        return module
    importlib.import_module("torch.ao.quantization.fx._decomposed")  # registers torch.ops.quantized_decomposed
    qd = torch.ops.quantized_decomposed
    gm = copy.deepcopy(module)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _FAKE_QUANT:
            continue
        a = dict(zip(_FAKE_QUANT[node.target], node.args)) | dict(node.kwargs)
        dtype = torch.uint8 if a["quant_min"] >= 0 else torch.int8
        if node.target is torch.fake_quantize_per_channel_affine:
            quant, dequant = qd.quantize_per_channel.default, qd.dequantize_per_channel.default
            params = (a["scale"], a["zero_point"], a["axis"], a["quant_min"], a["quant_max"], dtype)
        else:
            stored = [lookup(gm, a[k].target) if isinstance(a[k], torch.fx.Node) and a[k].op == "get_attr" else None
                      for k in ("scale", "zero_point")]
            if all(isinstance(t, torch.Tensor) and t.numel() == 1 for t in stored):  # constants of the export
                a["scale"], a["zero_point"] = float(stored[0].item()), int(stored[1].item())
            tensor_args = isinstance(a["scale"], torch.fx.Node) or isinstance(a["zero_point"], torch.fx.Node)
            quant = qd.quantize_per_tensor.tensor if tensor_args else qd.quantize_per_tensor.default
            dequant = qd.dequantize_per_tensor.tensor if tensor_args else qd.dequantize_per_tensor.default
            params = (a["scale"], a["zero_point"], a["quant_min"], a["quant_max"], dtype)
        with graph.inserting_before(node):
            q = graph.call_function(quant, (a["input"], *params))
            dq = graph.call_function(dequant, (q, *params))
        node.replace_all_uses_with(dq)
        graph.erase_node(node)
    gm.recompile()
    return gm


def _two_samples(wrapper, inputs, in_names, axes) -> tuple:
    """The example inputs, their batch of 1 repeated to 2 where axis 0 is dynamic: torch.export treats a size of
    1 as a constant wherever a kernel's stride rule asks about it (convolutions on strided views), and the export
    then holds reshapes sized for one sample behind an input declared dynamic (timm CSATv2 failed at batch 2 in
    ONNX Runtime).  The originals when the module does not run on the repeated batch."""
    two = tuple(torch.cat([t, t]) if axes and t.dim() and t.shape[0] == 1 and 0 in axes.get(n, {}) else t
                for n, t in zip(in_names, inputs))
    if all(a is b for a, b in zip(two, inputs)):
        return inputs
    try:
        with torch.no_grad():
            wrapper(*two)
    except Exception:  # noqa: BLE001 - a module for one sample only: export what the example gives
        return inputs
    return two


def _dynamo(wrapper, inputs, path, in_names, out_names, axes, opset, optimize: bool = True):
    shapes = tuple({d: torch.export.Dim.DYNAMIC for d in axes.get(n, {})} for n in in_names) if axes else None
    wrapper = _FlatOutputs(decompose_fake_quant(wrapper.module)).eval()
    inputs = _two_samples(wrapper, inputs, in_names, axes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, inputs, dynamo=True, input_names=in_names, output_names=out_names,
                                    dynamic_shapes=(shapes,) if shapes else None, opset_version=opset,
                                    external_data=False, verbose=False, optimize=optimize)
    program.save(str(path), external_data=False)


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    exporter: str = "auto",
    opset: int | None = None,
) -> Path:
    """Write ``module`` as ONNX to ``path``, validate it with ``onnx.checker`` and return the Path."""
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}.")
    inputs = normalize_inputs(example_inputs)
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{str(path)!r} is a directory; give the path of the .onnx file to write.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot write {str(path)!r}: {exc.strerror or exc}. Choose a writable path.") from None
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise ExportError(f"cannot write {str(path)!r}: permission denied. Choose a writable path.")
    was_training = module.training
    module.eval()
    try:
        return _export(module, inputs, path, dynamic_batch, exporter, opset)
    finally:
        module.train(was_training)


def _dynamic_axes(module, inputs, leaves, in_names, out_names) -> dict[str, dict[int, str]]:
    """The dynamic axes by input and output name: axis 0 of every input (``batch``), the axes torch.export kept
    symbolic when it captured the module (a sequence length, ``TraceInfo.dynamic_dims``), and the output axes whose
    size in the example is the size of one of those."""
    info = getattr(module, "meta", {}).get(meta.TRACE_INFO)
    captured = info.dynamic_dims if info is not None and len(info.dynamic_dims) == len(inputs) else ((),) * len(inputs)
    axes: dict[str, dict[int, str]] = {}
    by_size: dict[int, str] = {}
    for name, t, extra in zip(in_names, inputs, captured):
        dims = sorted({0, *extra}) if t.dim() else []
        axes[name] = {d: "batch" if d == 0 else f"{name}_{d}" for d in dims}
        for d in dims:
            by_size.setdefault(int(t.shape[d]), axes[name][d])
    batch = inputs[0].shape[0] if inputs[0].dim() else None
    for name, t in zip(out_names, leaves):
        out = {0: "batch"} if t.dim() and t.shape[0] == batch else {}
        out |= {d: by_size[int(size)] for d, size in enumerate(t.shape) if d > 0 and int(size) in by_size
                and by_size[int(size)] != "batch"}
        if out:
            axes[name] = out
    return axes


PROTOBUF_LIMIT = 2**31 - 1  # bytes: a larger model keeps its tensors outside the .onnx file


def external_files(model: onnx.ModelProto) -> set[str]:
    """The files the model's tensors are stored in, outside the .onnx file (an exporter writes one per tensor for
    a model over 2 GB)."""
    return {entry.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for entry in t.external_data if entry.key == "location"}


def save_model(model: onnx.ModelProto, path: Path, old_files: set[str] = frozenset()) -> None:
    """Write ``model`` (its tensors loaded) to ``path``: one file when it fits protobuf's 2 GB, else the graph in
    ``path`` and every tensor in one ``path.name + ".data"`` beside it; the scattered tensor files an exporter wrote
    (``old_files``, relative to the same folder) are removed."""
    tensors = sum(len(t.raw_data) if t.HasField("raw_data") else t.ByteSize() for t in model.graph.initializer)
    if tensors < PROTOBUF_LIMIT - 2**24:  # the graph itself: far less than 16 MB
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    for name in old_files - {path.name + ".data", path.name}:
        (path.parent / name).unlink(missing_ok=True)


def _export(module, inputs, path, dynamic_batch, exporter, opset) -> Path:
    outputs = run_example(module, inputs, type(module).__name__)
    leaves = pytree.tree_leaves(outputs)
    if not all(isinstance(t, torch.Tensor) for t in leaves):
        bad = next(type(t).__name__ for t in leaves if not isinstance(t, torch.Tensor))
        raise ExportError(f"{type(module).__name__} returns a {bad} among its outputs; ONNX outputs are tensors only.")
    in_names, out_names = input_names(module, len(inputs)), output_names(len(leaves))
    axes = _dynamic_axes(module, inputs, leaves, in_names, out_names) if dynamic_batch else None
    shared = codebook_layers(module)
    wrapper = _FlatOutputs(widen_fake_quant(frozen_copy(module) if shared else module)).eval()
    # The dynamo exporter's graph optimizer can drop a constant that a node still reads (timm Gemma4's clamps on
    # stored infinite bounds: a Clip whose min is produced nowhere); unoptimized, the same export is valid.
    functions = {"torchscript": _torchscript, "dynamo": _dynamo,
                 "dynamo (unoptimized)": functools.partial(_dynamo, optimize=False)}
    failures = []
    chosen = {"auto": list(functions), "torchscript": ["torchscript"], "dynamo": ["dynamo", "dynamo (unoptimized)"]}
    for name in chosen[exporter]:
        try:
            functions[name](wrapper, inputs, path, in_names, out_names, axes, opset)
            return _finish(path, shared)
        except Exception as exc:  # noqa: BLE001 - the next exporter may succeed; all failures are reported
            log.info("%s exporter failed: %s", name, exc)
            failures.append(f"{name}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
    raise ExportError(f"cannot export {type(module).__name__} to ONNX:\n  " + "\n  ".join(failures) +
                      "\n  hint: an op without an ONNX translation is usually named above; replace it or keep it "
                      "out of the exported module.")


def _add_value_shapes(path: Path, constants: bool = True) -> None:
    """Write the shapes of the file's values into it (ONNX shape inference), except around a residual add that
    feeds a LayerNormalization.  Without shapes ORT's planner cannot run an elementwise op in place (T5's FFN ReLU
    on a fresh 1.5 MB buffer took twice as long: the INT8 T5 encoder 3 % slower); with the add's shapes known it
    fuses add and norm into SkipLayerNormalization, which on ORT 1.32's CPU provider takes 0.55 ms for 128 x 768
    where the two ops take 0.1 ms (base-width BERT and DistilBERT 10 % slower).  ``constants=False`` leaves out
    values computed from initializers alone (ORT folds them when the session starts): a compact file's weight
    rebuilding needs no shapes."""
    model = onnx.load(str(path), load_external_data=False)  # tensors kept outside stay there, by reference
    model = onnx.shape_inference.infer_shapes(model)
    producer = {out: n for n in model.graph.node for out in n.output}
    skip = set()
    for n in model.graph.node:
        add = producer.get(n.input[0]) if n.op_type == "LayerNormalization" and n.input else None
        if add is not None and add.op_type == "Add":
            skip.update((n.input[0], *add.input))
    if not constants:
        skip |= _constant_values(model.graph)
    kept = [v for v in model.graph.value_info if v.name not in skip]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    onnx.save_model(model, str(path))


def _constant_values(graph: onnx.GraphProto) -> set[str]:
    known = {i.name for i in graph.initializer}
    out = set()
    for n in graph.node:
        if all(not x or x in known for x in n.input):
            known.update(n.output)
            out.update(n.output)
    return out


def _finish(path: Path, shared: dict | None = None) -> Path:
    """Weights gathered into the file, QDQ finalized, weight-shared layers stored as codes and codebooks
    (``codebook.compact``), value shapes inferred, and the file checked: an invalid file is an ExportError."""
    model = onnx.load(str(path), load_external_data=False)
    scattered = external_files(model)
    if scattered:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    quantized = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    if quantized:
        model = finalize_qdq(model)
    if shared:
        model = compact(model, shared)
    if scattered or quantized or shared:
        save_model(model, path, scattered)
    del model
    try:
        _add_value_shapes(path, constants=not shared)
    except Exception as exc:  # noqa: BLE001 - the checker below reports a file that is invalid
        log.info("shape inference of %s failed: %s", path, exc)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"the exported {path} fails onnx.checker: {exc}") from exc
    return path
