"""Layer latency tables: the one-layer graphs compute the layer and fuse as a lowered model does, tables predict
from their sweeps and come back from the cache without measuring (timings themselves are not asserted)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from fxcompress.passes.pruning.lib import latency
from fxcompress.passes.pruning.lib.latency import LayerShape
from onnx import numpy_helper

import fxcompress as fxc
from fxcompress.cli import main
from fxcompress.export.ort import run, session

CONV = LayerShape("conv", 8, 24, (3, 3), (2, 2), (1, 1), (1, 1), False, (9, 9), 2)
DEPTHWISE = LayerShape("conv", 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), True, (8, 8), 2)
LINEAR = LayerShape("linear", 32, 10, spatial=(5,), batch=3)


@pytest.mark.parametrize("shape", [CONV, DEPTHWISE, LINEAR], ids=["conv", "depthwise", "linear"])
def test_the_float_layer_graph_computes_the_layer(shape):
    model = latency.layer_model(shape, "ort-fp32")
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    module = latency.layer_module(shape)
    module.weight.data, module.bias.data = weights["w"], weights["b"]
    x = torch.rand(latency.input_shape(shape))
    (got,) = run(session(model.SerializeToString(), threads=1), x)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), module(x), rtol=1e-4, atol=1e-4)
    assert shape.macs > 0


@pytest.mark.parametrize("shape,fused", [(CONV, "QLinearConv"), (DEPTHWISE, "QLinearConv"), (LINEAR, "QGemm")])
def test_the_int8_layer_graph_fuses_into_the_integer_kernel(shape, fused):
    ops = latency.fused_ops(shape, "ort-int8")
    assert ops.get(fused) == 1 and "Conv" not in ops and "Gemm" not in ops


def test_layer_shapes_of_a_traced_model():
    model, x = fxc.golden.load("mobilenetv2-digits")
    shapes = latency.layer_shapes(fxc.trace(model, x))
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(shapes) == len(convs)
    assert any(s.depthwise for s in shapes.values()) and any(s.kind == "linear" for s in shapes.values())
    assert all(s.batch == x[0].shape[0] for s in shapes.values())
    assert len(set(shapes.values())) < len(shapes)  # repeated blocks share a shape, measured once


def test_sweeps_measure_aligned_and_misaligned_widths_through_their_anchors():
    assert latency.grid(64, 16) == list(range(4, 65, 4))
    wide = latency.grid(2048, 16)
    assert wide[-1] == 2048 and len(wide) <= 17 and all(w % 4 == 0 for w in wide)
    assert latency.grid(3, 16) == [3]
    assert latency.anchors(64) == {True: 64, False: 62} and latency.anchors(10) == {True: 8, False: 10}
    assert latency.anchors(3) == {False: 3}
    widths = latency.widths(64, 16)
    assert {4, 62, 64} <= set(widths) and any(w % 4 for w in widths)
    plan = latency.sweep_plan(CONV, 16)
    assert set(plan) == {"out@8", "out@6", "in@24", "in@22"}
    assert all(p[0] == 8 for p in plan["out@8"]) and all(p[1] == 22 for p in plan["in@22"])
    assert set(latency.sweep_plan(DEPTHWISE, 16)) == {"dw"}


def _blocks(shape, runtime, widths, threads=1, runs=15, warmup=3):
    """Synthetic times: a cost level per started block of 16 output channels, linear in the input width, and 1.3x
    for an input width that is no multiple of 4 (whatever the output width)."""
    return {(i, o): 1e-4 * (1 + (o + 15) // 16) * (0.5 + i / 64) * (1.3 if i % 4 else 1.0) for i, o in widths}


def test_a_table_predicts_from_its_sweeps_and_comes_back_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "sweep", _blocks)
    shape = LayerShape("conv", 64, 64, (3, 3), (1, 1), (1, 1), (1, 1), False, (8, 8), 8)
    table = latency.build_table([shape, shape], "ort-int8")
    sweep = table.out_sweep(shape)
    assert latency.rises(sweep) == [16, 32, 48]  # the block structure shows
    assert latency.misalignment(table.sweeps[latency.layer_key(shape)]["in@64"]) == pytest.approx(1.3, rel=0.05)
    assert table.seconds(shape) == pytest.approx(_blocks(None, None, [(64, 64)])[(64, 64)])
    # every kind of width pair is its own separable surface: exact for these times, measured or not
    for i, o in [(32, 48), (24, 16), (64, 8), (30, 48), (62, 30), (29, 30), (32, 30), (29, 14)]:
        assert table.seconds(shape, i, o) == pytest.approx(_blocks(None, None, [(i, o)])[(i, o)])
    assert len(list(tmp_path.rglob("*.json"))) == 1  # one shape, measured once

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(latency, "sweep", no_measuring)
    again = latency.build_table([shape], "ort-int8")
    assert again.sweeps == table.sweeps
    assert latency.LatencyTable.from_json(again.to_json()) == again
    widths = {"a": (32, 32)}
    assert latency.model_seconds(again, {"a": shape, "b": shape}, widths) == pytest.approx(
        again.seconds(shape, 32, 32) + again.seconds(shape))
    with pytest.raises(AssertionError, match="measured again"):
        latency.build_table([shape], "ort-int8", threads=2)  # another thread count is another table


def test_a_wide_layer_charges_every_width_of_a_block_what_the_block_costs(tmp_path, monkeypatch):
    # 256 output channels on 16 points: the grid steps by 16, so only the widths just past its points (20, 36,
    # ...) show where the cost climbs; a line through the grid alone would make 36 channels cheaper than 48
    assert latency.step_starts(256, 16) == list(range(20, 256, 16))
    assert latency.step_starts(64, 16) == [] and latency.step_starts(3, 16) == []
    monkeypatch.setenv("FXCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "sweep", _blocks)
    shape = LayerShape("conv", 64, 256, (3, 3), (1, 1), (1, 1), (1, 1), False, (4, 4), 8)
    table = latency.build_table([shape], "ort-int8")
    for o in (20, 24, 36, 40, 44, 48, 100, 104, 112, 244, 256):
        assert table.seconds(shape, 64, o) == pytest.approx(_blocks(None, None, [(64, o)])[(64, o)])
    assert table.seconds(shape, 64, 36) == pytest.approx(table.seconds(shape, 64, 48))


def test_a_depthwise_layer_has_one_width():
    table = latency.LatencyTable("ort-int8", 1, "m", {latency.layer_key(DEPTHWISE): {"dw": {8: 1.0, 16: 2.0,
                                                                                            6: 1.5, 14: 2.5}}})
    assert table.seconds(DEPTHWISE, 8, 8) == 1.0 and table.seconds(DEPTHWISE) == 2.0
    assert table.seconds(DEPTHWISE, 12, 12) == 1.5 and table.seconds(DEPTHWISE, 10, 10) == 2.0
    assert DEPTHWISE.at(8, 99).cout == 8


def test_one_real_sweep_runs_in_each_runtime():
    for runtime in latency.RUNTIMES:
        times = latency.sweep(CONV, runtime, [(8, 8), (8, 24)], runs=2, warmup=1)
        assert set(times) == {(8, 8), (8, 24)} and all(t > 0 for t in times.values())


def test_bad_options_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCOMPRESS_CACHE", str(tmp_path))
    with pytest.raises(fxc.InputError, match="runtime"):
        latency.build_table([CONV], "tensorrt")
    with pytest.raises(fxc.InputError, match="threads"):
        latency.build_table([CONV], "ort-int8", threads=0)
    with pytest.raises(fxc.InputError, match="points"):
        latency.build_table([CONV], "ort-int8", points=0)
    with pytest.raises(fxc.InputError, match="no layer"):
        latency.LatencyTable("ort-int8", 1, "m").seconds(CONV)
    assert main(["latency", "resnet20-digits", "--batch", "0"]) != 0


def test_the_latency_command_prints_layers_and_their_cost_rises(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FXCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "sweep", _blocks)
    assert main(["latency", "resnet20-digits", "--batch", "8", "--json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "layer3_0_conv2" in out and "16, 32, 48" in out and "sum of layers" in out
    assert (tmp_path / "t.json").is_file()
    table = latency.LatencyTable.from_json(json.loads((tmp_path / "t.json").read_text()))
    assert np.isfinite(table.seconds(LayerShape("linear", 64, 10, batch=8)))


def test_kernel_seconds_leave_out_the_boundary_nodes_and_the_warmup(tmp_path):
    def node(op, ts, dur):
        return {"cat": "Node", "name": f"n_{op}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100}, node("QLinearConv", 10, 50),
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100}, node("QuantizeLinear", 205, 20),
              node("QLinearConv", 230, 40), node("Transpose", 275, 5),
              {"cat": "Session", "name": "model_run", "ts": 400, "dur": 100}, node("QLinearConv", 410, 30),
              node("DequantizeLinear", 450, 9)]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(events))
    assert latency.kernel_seconds(str(path), skip=1) == pytest.approx([40e-6, 30e-6])
