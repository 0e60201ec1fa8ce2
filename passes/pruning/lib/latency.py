"""Measured latency of the layers pruning resizes: each Conv/Linear as a one-layer ONNX graph, timed in the runtime
it will run in, over a grid of widths.

A layer's cost is not its MACs: ONNX Runtime's U8S8 kernels pack output channels in blocks, so widths between two
block sizes cost the same time, and on small maps the per-node overhead outweighs the arithmetic.  Measuring each
layer shape at the widths pruning can give it shows both, on the user's machine and runtime:

- ``LayerShape``: what a layer's time depends on besides its widths (kind, kernel, stride, padding, dilation,
  depthwise or not, the input's spatial size, the batch); ``layer_shapes(gm)`` lists those of a traced module.
- ``layer_model(shape, runtime)``: the layer alone as an ONNX model, float (``ort-fp32``) or QDQ with uint8
  activations, per-channel int8 weights and an int32 bias (``ort-int8``, which ONNX Runtime fuses into QLinearConv /
  QGemm as it does for a model ``quantize`` lowered); ``layer_module`` the same layer for ``torch``.
- ``sweep(shape, runtime, widths, threads)``: median seconds per call at each (input, output) width pair, the pairs
  alternated round by round so that a shared machine's drift falls on all of them.  In ONNX Runtime a layer's time
  is its kernels' time from ORT's profiler: the quantize/dequantize/transpose nodes at the one-layer graph's
  boundary are not part of it (inside a model consecutive layers do without them).  On ResNet-20, int8, batch 8,
  whole one-layer graphs summed to 3.35 ms against 2.41 ms of QLinearConv/QGemm time in the model; their kernels
  alone sum to 2.32 ms.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from fxcompress import meta, ops
from fxcompress.errors import InputError
from fxcompress.export.ort import optimized_op_counts, session
from fxcompress.timing import alternated_latency, cpu_model

RUNTIMES = ("ort-int8", "ort-fp32", "torch")
TABLE_FORMAT = 6  # in the cache key: tables of an older layout are measured again
OPSET = 17


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """A Conv/Linear layer's shape apart from its widths (``cin``, ``cout``: the widths it has in the model)."""

    kind: str  # "conv" or "linear"
    cin: int
    cout: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    depthwise: bool = False  # groups == cin == cout / multiplier: widths change together
    spatial: tuple[int, ...] = ()  # the input's spatial size (conv) or its rows besides the batch (linear)
    batch: int = 1

    def at(self, cin: int, cout: int) -> LayerShape:
        """The same layer at other widths (a depthwise conv keeps its channel multiplier)."""
        if self.depthwise:
            cout = cin * (self.cout // self.cin)
        return dataclasses.replace(self, cin=cin, cout=cout)

    @property
    def macs(self) -> int:
        if self.kind == "linear":
            return self.batch * math.prod(self.spatial) * self.cin * self.cout
        out = [(s + 2 * p - d * (k - 1) - 1) // st + 1
               for s, p, d, k, st in zip(self.spatial, self.padding, self.dilation, self.kernel, self.stride)]
        per_out = (1 if self.depthwise else self.cin) * math.prod(self.kernel)
        return self.batch * math.prod(out) * self.cout * per_out


def layer_shapes(gm: torch.fx.GraphModule) -> dict[str, LayerShape]:
    """{node name: shape} of every Conv1d/2d/3d and Linear module call with shape metadata (ConvTranspose and
    grouped, non-depthwise convs are left out: pruning resizes them with their groups)."""
    shapes = {}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module" or ops.of_node(gm, node, "quant", modules, exact=True) not in ("conv", "linear"):
            continue
        m, x = modules[node.target], node.args[0] if node.args else None
        info = meta.tensor_info(x) if isinstance(x, torch.fx.Node) else None
        if info is None:
            continue
        if isinstance(m, nn.Linear):
            shapes[node.name] = LayerShape("linear", m.in_features, m.out_features, spatial=tuple(info.shape[1:-1]),
                                           batch=info.shape[0])
            continue
        depthwise = m.groups > 1 and m.groups == m.in_channels
        if (m.groups > 1 and not depthwise) or isinstance(m.padding, str) or m.padding_mode != "zeros":
            continue
        shapes[node.name] = LayerShape("conv", m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                                       tuple(m.padding), tuple(m.dilation), depthwise, tuple(info.shape[2:]),
                                       info.shape[0])
    return shapes


def input_shape(shape: LayerShape) -> list[int]:
    """The shape of the layer's input (a Linear's leading dims flattened into rows)."""
    if shape.kind == "linear":
        return [shape.batch * math.prod(shape.spatial), shape.cin]
    return [shape.batch, shape.cin, *shape.spatial]


def _weight(shape: LayerShape, rng: np.random.Generator) -> np.ndarray:
    if shape.kind == "linear":
        return rng.standard_normal((shape.cout, shape.cin)).astype(np.float32)
    per_group = 1 if shape.depthwise else shape.cin
    return rng.standard_normal((shape.cout, per_group, *shape.kernel)).astype(np.float32)


def layer_model(shape: LayerShape, runtime: str) -> onnx.ModelProto:
    """The layer alone, as ONNX: float, or QDQ (uint8 activations, per-channel int8 weights, int32 bias)."""
    if runtime not in ("ort-fp32", "ort-int8"):
        raise InputError(f"layer_model builds ONNX for the ort runtimes, not {runtime!r}.")
    rng = np.random.default_rng(0)
    w = _weight(shape, rng)
    bias = rng.standard_normal(shape.cout).astype(np.float32)
    inits, nodes = [], []
    if shape.kind == "linear":
        op, attrs = "Gemm", {"transB": 1}
    else:
        op, attrs = "Conv", {"kernel_shape": list(shape.kernel), "strides": list(shape.stride),
                             "pads": list(shape.padding) * 2, "dilations": list(shape.dilation),
                             "group": shape.cin if shape.depthwise else 1}
    x_in, y_out = "x", "y"
    if runtime == "ort-fp32":
        inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")]
        nodes.append(helper.make_node(op, ["x", "w", "b"], ["y"], **attrs))
    else:
        x_scale, y_scale = np.float32(4.0 / 255), np.float32(8.0 / 255)
        w_scale = (np.abs(w).reshape(shape.cout, -1).max(1) / 127).astype(np.float32)
        w_q = np.clip(np.rint(w / w_scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
        b_scale = (x_scale * w_scale).astype(np.float32)
        inits += [numpy_helper.from_array(np.array(x_scale), "x_scale"),
                  numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
                  numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(w_scale, "w_scale"),
                  numpy_helper.from_array(np.zeros(shape.cout, np.int8), "w_zero"),
                  numpy_helper.from_array(np.rint(bias / b_scale).astype(np.int32), "b_q"),
                  numpy_helper.from_array(b_scale, "b_scale"),
                  numpy_helper.from_array(np.zeros(shape.cout, np.int32), "b_zero")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
                  helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0),
                  helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zero"], ["b"], axis=0)]
        if shape.kind == "linear":  # QGemm keeps a float output, as a lowered Linear does
            nodes.append(helper.make_node(op, ["xd", "w", "b"], ["y"], **attrs))
        else:  # QLinearConv has a uint8 output
            inits += [numpy_helper.from_array(np.array(y_scale), "y_scale"),
                      numpy_helper.from_array(np.array(0, np.uint8), "y_zero")]
            nodes += [helper.make_node(op, ["xd", "w", "b"], ["yf"], **attrs),
                      helper.make_node("QuantizeLinear", ["yf", "y_scale", "y_zero"], ["yq"]),
                      helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["y"])]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info(x_in, TensorProto.FLOAT,
                                                                             input_shape(shape))],
                              [helper.make_tensor_value_info(y_out, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def layer_module(shape: LayerShape) -> nn.Module:
    """The layer alone as a PyTorch module (eval mode), for the ``torch`` runtime."""
    if shape.kind == "linear":
        return nn.Linear(shape.cin, shape.cout).eval()
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(shape.kernel)]
    return conv(shape.cin, shape.cout, shape.kernel, shape.stride, shape.padding, shape.dilation,
                groups=shape.cin if shape.depthwise else 1).eval()


def runner(shape: LayerShape, runtime: str, threads: int = 1,
           profile_prefix: Path | None = None) -> tuple[Callable[[], object], ort.InferenceSession | None]:
    """(a function that runs the layer once in ``runtime`` on a fixed random input, its ORT session or None);
    ``profile_prefix``: the session records ORT's per-node profile to a file of that prefix."""
    if runtime not in RUNTIMES:
        raise InputError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}.")
    x = np.random.default_rng(1).random(input_shape(shape), dtype=np.float32)
    if runtime == "torch":
        module, tx = layer_module(shape), torch.from_numpy(x)

        def run_torch() -> object:
            with torch.no_grad():
                return module(tx)
        return run_torch, None
    sess = session(layer_model(shape, runtime).SerializeToString(), threads=threads, spinning=False,
                   profile_prefix=profile_prefix)
    name = sess.get_inputs()[0].name
    return (lambda: sess.run(None, {name: x})), sess


ALIGN = 4
"""Widths that are multiples of ``ALIGN`` and widths that are not take different kernel paths in ONNX Runtime's CPU
convolutions, so a table measures both kinds and never interpolates across them.  Measured on an AVX-512 CPU
(ResNet-20's 32-channel 3x3 conv, batch 8): U8S8 at 30 output channels costs 1.37x its time at 32, at 30 input
channels 1.46x whatever the output width; fp32 at 30 input channels 1.45x, while fp32 output widths do not matter."""


BOUNDARY_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Transpose", "ReorderInput", "ReorderOutput"})
"""Nodes of a one-layer graph that exist only at its boundary (quantizing its float input, dequantizing its output,
ORT's NHWC transposes for int8 and NCHWc reorders for fp32): inside a model consecutive layers do without them, so a
layer's time excludes them."""


def boundary_ops(runtime: str, cin: int) -> frozenset[str]:
    """The boundary ops left out of a layer's time.  An fp32 conv whose input width is no multiple of ``ALIGN``
    reads plain NCHW, so inside a model the blocked (NCHWc) output of the layer before it is reordered for it: the
    reorder its one-layer graph ends with stands for that one and counts."""
    if runtime == "ort-fp32" and cin % ALIGN:
        return BOUNDARY_OPS - {"ReorderOutput"}
    return BOUNDARY_OPS


def kernel_events(profile: str, skip: int) -> tuple[int, list[tuple[int, str, str, float]]]:
    """The runs of an ORT profile after the first ``skip`` and, for each of their nodes' kernel calls, (run index,
    op type, node name, seconds)."""
    events = json.loads(Path(profile).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[skip:]
    starts = [a for a, _ in runs]
    out = []
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= 0 and e["ts"] <= runs[i][1]:
            out.append((i, e["args"].get("op_name", ""), e["name"][:-len("_kernel_time")], e["dur"] * 1e-6))
    return len(runs), out


def kernel_seconds(profile: str, skip: int, boundary: frozenset[str] = BOUNDARY_OPS) -> list[float]:
    """Per run of an ORT profile (after the first ``skip`` runs): the seconds of its nodes' kernels, the
    ``boundary`` ops excluded."""
    runs, events = kernel_events(profile, skip)
    totals = [0.0] * runs
    for i, op, _, seconds in events:
        if op not in boundary:
            totals[i] += seconds
    return totals


def fused_ops(shape: LayerShape, runtime: str) -> dict[str, int]:
    """Op counts of the layer's graph after ORT's optimisations (QLinearConv / QGemm when the QDQ fused)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/layer.onnx"
        onnx.save(layer_model(shape, runtime), path)
        return optimized_op_counts(path)


def sweep(shape: LayerShape, runtime: str, widths: Iterable[tuple[int, int]], threads: int = 1, runs: int = 15,
          warmup: int = 3) -> dict[tuple[int, int], float]:
    """Median seconds per call of ``shape`` at each (cin, cout) in ``widths``, the pairs alternated round by round.
    In ONNX Runtime the time is that of the layer's kernels from ORT's own profile, without the boundary ops
    (``BOUNDARY_OPS``) a one-layer graph needs and a model does not; in PyTorch it is the call's wall time."""
    pairs = list(dict.fromkeys(widths))
    with tempfile.TemporaryDirectory(prefix="fxcompress-latency-") as tmp:
        calls, sessions = {}, {}
        for i, pair in enumerate(pairs):
            prefix = Path(tmp) / f"layer{i}" if runtime != "torch" else None
            calls[pair], sessions[pair] = runner(shape.at(*pair), runtime, threads, prefix)
        times = alternated_latency(calls, runs, warmup)  # wall seconds (what counts for torch)
        for pair, sess in sessions.items():
            if sess is not None:
                times[pair] = statistics.median(kernel_seconds(sess.end_profiling(), warmup,
                                                               boundary_ops(runtime, pair[0])))
    return times


def grid(full: int, points: int, step: int = ALIGN) -> list[int]:
    """Widths to measure up to ``full``: multiples of ``step`` (of a coarser multiple of it when there would be
    more than ``points``), and ``full`` itself."""
    stride = step * max(1, math.ceil(full / step / points))
    return sorted({*range(stride, full, stride), full})


def misaligned(full: int, points: int, step: int = ALIGN) -> list[int]:
    """Widths that are no multiple of ``step``, half a step below points of ``grid``: what a pruned layer's width
    costs off the aligned widths."""
    return sorted({w - step // 2 for w in grid(full, points, step) if w - step // 2 >= 1} - {full}) \
        if step > 1 else []


def anchors(full: int) -> dict[bool, int]:
    """{aligned: the largest width of that kind up to ``full``}: the fixed widths the other dimension is swept at."""
    out = {}
    if full >= ALIGN:
        out[True] = full - full % ALIGN
    if full % ALIGN or full > ALIGN // 2:
        out[False] = full if full % ALIGN else full - ALIGN // 2
    return out


def step_starts(full: int, points: int, step: int = ALIGN) -> list[int]:
    """The aligned width just past each point of a ``grid`` coarser than ``step``.  Kernels that pack channels in
    blocks (U8S8 convolutions: 16 output channels on AVX-512) cost the same from one block boundary up to the next
    and step up just past it, so a line through the grid alone would charge widths between two block boundaries
    less than the boundary above them, which costs the same; with these widths the line climbs right after each
    grid point and stays flat up to the next."""
    stride = step * max(1, math.ceil(full / step / points))
    return sorted({w + step for w in range(stride, full, stride) if w + step < full}) if stride > step else []


def widths(full: int, points: int) -> list[int]:
    """Widths a sweep measures up to ``full``: the aligned grid and the width past each of its points, half as many
    misaligned widths, the anchors."""
    return sorted({*grid(full, points), *step_starts(full, points), *misaligned(full, max(1, points // 2)),
                   *anchors(full).values()})


def sweep_plan(shape: LayerShape, points: int) -> dict[str, list[tuple[int, int]]]:
    """The (cin, cout) pairs to measure, by sweep: ``out@I`` varies the output width at input width I, ``in@O`` the
    input width at output width O, for I and O the anchors of each kind; ``dw`` the channels of a depthwise conv."""
    if shape.depthwise:
        return {"dw": [(w, w) for w in widths(shape.cin, points)]}
    plan = {f"out@{i}": [(i, o) for o in widths(shape.cout, points)] for i in anchors(shape.cin).values()}
    plan.update({f"in@{o}": [(i, o) for i in widths(shape.cin, points)] for o in anchors(shape.cout).values()})
    return plan


class _Line:
    """Measured seconds along one width, interpolated linearly; below the narrowest measured width the time stays
    at its value (a kernel's fixed cost does not shrink with the width), above the widest it grows in proportion."""

    def __init__(self, measured: dict[int, float]):
        w = sorted(measured)
        self.w, self.t = np.array(w, float), np.array([measured[x] for x in w])

    def __call__(self, x: int) -> float:
        w, t = self.w, self.t
        if x <= w[0]:
            return float(t[0])
        if x >= w[-1]:
            return float(t[-1] * x / w[-1])
        return float(np.interp(x, w, t))


class LayerCurve:
    """A layer's seconds at any widths (cin, cout) from its sweeps.  Each of the four kinds of width pair
    (input aligned or not x output aligned or not) is its own separable surface through its anchor point:
    ``T(i, o) = T_in(i | o's anchor) x T_out(o | i's anchor) / T(anchors)``, each factor read from the widths of the
    same kind.  A depthwise conv has one width, read from the widths of its kind."""

    def __init__(self, shape: LayerShape, sweeps: dict[str, dict[int, float]]):
        self.regimes: dict[tuple[bool, bool], tuple[_Line, _Line, float]] = {}
        self.lines: dict[bool, _Line] = {}
        if shape.depthwise:
            dw = sweeps["dw"]
            for kind in (True, False):
                mine = {w: t for w, t in dw.items() if (w % ALIGN == 0) == kind}
                if mine:
                    self.lines[kind] = _Line(mine)
            return
        ai, ao = anchors(shape.cin), anchors(shape.cout)
        for ki, i in ai.items():
            for ko, o in ao.items():
                outs, ins = sweeps[f"out@{i}"], sweeps[f"in@{o}"]
                g = _Line({w: t for w, t in outs.items() if (w % ALIGN == 0) == ko})
                f = _Line({w: t for w, t in ins.items() if (w % ALIGN == 0) == ki})
                self.regimes[(ki, ko)] = (f, g, outs[o])

    def __call__(self, cin: int, cout: int) -> float:
        if self.lines:
            line = self.lines.get(cin % ALIGN == 0) or next(iter(self.lines.values()))
            return line(cin)
        f, g, ref = self.regimes.get((cin % ALIGN == 0, cout % ALIGN == 0)) or next(iter(self.regimes.values()))
        return f(cin) * g(cout) / ref


def layer_key(shape: LayerShape) -> str:
    """The table's key of a layer shape."""
    return json.dumps(dataclasses.asdict(shape), sort_keys=True)


@dataclasses.dataclass
class LatencyTable:
    """Measured seconds of each layer shape over its sweeps (``sweep_plan``); ``seconds`` predicts any widths
    (``LayerCurve``)."""

    runtime: str
    threads: int
    machine: str  # what the times are valid for: CPU model and runtime versions
    sweeps: dict[str, dict[str, dict[int, float]]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._curves: dict[str, LayerCurve] = {}

    def curve(self, shape: LayerShape) -> LayerCurve:
        key = layer_key(shape)
        if key not in self.sweeps:
            raise InputError(f"the latency table has no layer {shape}; build it for this model.")
        if key not in self._curves:
            self._curves[key] = LayerCurve(shape, self.sweeps[key])
        return self._curves[key]

    def seconds(self, shape: LayerShape, cin: int | None = None, cout: int | None = None) -> float:
        """Predicted seconds of ``shape`` at widths (cin, cout) (its own widths when None)."""
        return self.curve(shape)(shape.cin if cin is None else cin, shape.cout if cout is None else cout)

    def out_sweep(self, shape: LayerShape) -> dict[int, float]:
        """Seconds along the output width at the full (aligned) input width: where the cost steps up."""
        sweeps = self.sweeps[layer_key(shape)]
        if shape.depthwise:
            return sweeps["dw"]
        return sweeps[f"out@{anchors(shape.cin).get(True, shape.cin)}"]

    def to_json(self) -> dict:
        return {"runtime": self.runtime, "threads": self.threads, "machine": self.machine, "format": TABLE_FORMAT,
                "sweeps": {k: {name: {str(w): t for w, t in line.items()} for name, line in v.items()}
                           for k, v in self.sweeps.items()}}

    @classmethod
    def from_json(cls, data: dict) -> LatencyTable:
        if data.get("format") != TABLE_FORMAT:
            raise InputError(f"latency table format {data.get('format')!r} is not {TABLE_FORMAT}; build it again.")
        return cls(data["runtime"], data["threads"], data["machine"], _sweeps_from_json(data["sweeps"]))


def _sweeps_from_json(data: dict) -> dict:
    return {k: {name: {int(w): t for w, t in line.items()} for name, line in v.items()} for k, v in data.items()}


def misalignment(measured: dict[int, float]) -> float | None:
    """How much more the widths of a sweep that are no multiple of ``ALIGN`` cost than the aligned widths around
    them (median ratio; None when the sweep lacks either kind)."""
    aligned = {w: t for w, t in measured.items() if w % ALIGN == 0}
    other = {w: t for w, t in measured.items() if w % ALIGN and aligned and min(aligned) < w < max(aligned)}
    if not other:
        return None
    line = _Line(aligned)
    return statistics.median(t / line(w) for w, t in other.items())


def machine() -> str:
    """The CPU model and the runtime versions a table is valid for."""
    return f"{cpu_model()}; onnxruntime {ort.__version__}; torch {torch.__version__}"


def cache_dir() -> Path:
    """Where measured sweeps are kept between runs (``FXCOMPRESS_CACHE`` or ``~/.cache/fxcompress``)."""
    return Path(os.environ.get("FXCOMPRESS_CACHE", Path.home() / ".cache" / "fxcompress")) / "latency"


def build_table(shapes: Iterable[LayerShape], runtime: str, threads: int = 1, points: int = 16, runs: int = 15,
                cache: bool = True, log: Callable[[str], None] = lambda message: None) -> LatencyTable:
    """Measure every distinct layer shape (a layer used at several places is measured once), reading and writing
    the on-disk cache keyed by machine, runtime, threads and shape."""
    if runtime not in RUNTIMES:
        raise InputError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}.")
    if not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be a positive integer, got {threads!r}.")
    if not isinstance(points, int) or isinstance(points, bool) or points < 1:
        raise InputError(f"points (widths measured per sweep) must be a positive integer, got {points!r}.")
    table = LatencyTable(runtime, threads, machine())
    unique = list(dict.fromkeys(shapes))
    for i, shape in enumerate(unique):
        key = layer_key(shape)
        digest = hashlib.sha256(f"{TABLE_FORMAT}|{table.machine}|{runtime}|{threads}|{points}|{key}".encode()
                                ).hexdigest()[:24]
        path = cache_dir() / f"{digest}.json"
        if cache and path.is_file():
            table.sweeps[key] = _sweeps_from_json({key: json.loads(path.read_text())["sweeps"]})[key]
            continue
        log(f"latency: measuring layer {i + 1}/{len(unique)} ({shape.kind} {shape.cin}->{shape.cout})")
        plan = sweep_plan(shape, points)
        measured = sweep(shape, runtime, [pair for pairs in plan.values() for pair in pairs], threads, runs)
        table.sweeps[key] = {name: {(p[1] if name.startswith("out@") else p[0]): measured[p] for p in pairs}
                             for name, pairs in plan.items()}
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"shape": key, "machine": table.machine, "runtime": runtime,
                                        "sweeps": table.sweeps[key]}))
    return table


def rises(measured: dict[int, float], tolerance: float = 0.05) -> list[int]:
    """The aligned widths after which the measured time rises by more than ``tolerance`` (the last width of each
    cost level): with U8S8 kernels that pack 16 output channels, 16, 32, 48, ...  Widths just below a rise cost the
    same as it; pruning to them saves MACs, not time."""
    measured = {w: t for w, t in measured.items() if w % ALIGN == 0} or measured
    widths = sorted(measured)
    return [a for a, b in zip(widths, widths[1:]) if measured[b] > measured[a] * (1 + tolerance)]


def model_seconds(table: LatencyTable, shapes: dict[str, LayerShape],
                  widths: dict[str, tuple[int, int]] | None = None) -> float:
    """Predicted seconds of all the layers ``shapes`` names, each at its widths in ``widths`` (default: its own)."""
    widths = widths or {}
    return sum(table.seconds(shape, *widths.get(name, (None, None))) for name, shape in shapes.items())
