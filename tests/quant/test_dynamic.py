"""Dynamic quantization (int8 Linear weights, activations quantized per batch on ORT's integer kernels) and int8
embedding tables, in both modes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxcompress as fxc
from fxcompress.export.ort import optimized_op_counts, run
from fxcompress.instruments import sqnr_db
from fxcompress.modules import quantized_embedding


def test_dynamic_mode_runs_linear_layers_on_ort_integer_kernels(tmp_path):
    model, example = fxc.golden.load("vit-tiny-digits")
    images, labels = fxc.golden.digits("test")
    result = fxc.compile(model, example, [{"pass": "quantize", "mode": "dynamic"}])  # no calibration data needed
    linears = result.history[1].stats["weights"]
    assert linears == 9 and result.history[2].stats == {"sites": 0}
    path = result.export_onnx(tmp_path / "dynamic.onnx")
    counts = optimized_op_counts(path)
    assert counts.get("DynamicQuantizeMatMul", 0) == linears
    got = run(path, images)[0]
    with torch.no_grad():
        sim, reference = result.module(images).numpy(), model(images).numpy()
    assert np.abs(got - sim).max() <= 2 * (reference.max() - reference.min()) / 255
    assert np.mean(got.argmax(1) == labels.numpy()) >= np.mean(reference.argmax(1) == labels.numpy()) - 0.005


@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_weights_export_one_zero_point_and_a_scale_per_row_or_one(per_channel, tmp_path):
    """Symmetric int8 weights: the file gives MatMulInteger one zero point (ORT runs a vector of them, even of
    zeros, on a slower path) and one scale when the weight is per tensor."""
    import onnx
    from onnx import numpy_helper
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval(), torch.randn(2, 5, 16)
    result = fxc.compile(model, (x,), [{"pass": "quantize", "mode": "dynamic", "per_channel": per_channel}])
    graph = onnx.load(result.export_onnx(tmp_path / "m.onnx")).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:  # the exporter gives equal constants one initializer and the others Identity nodes
        if n.op_type == "Identity" and n.input[0] in values:
            values[n.output[0]] = values[n.input[0]]
    zero_points = [values[n.input[3]] for n in graph.node if n.op_type == "MatMulInteger"]
    assert len(zero_points) == 2 and all(z.shape == () and z == 0 for z in zero_points)
    scales = [result.module.qparams.get_buffer(f"{k}_w_scale") for k in ("_0", "_2")]
    assert [s.dim() for s in scales] == ([1, 1] if per_channel else [0, 0])
    with torch.no_grad():
        sim = result.module(x).numpy()
    assert np.abs(run(result.export_onnx(tmp_path / "m.onnx"), (x,))[0] - sim).max() <= 1e-5 * np.abs(sim).max()


class Conv1DLike(nn.Module):
    """GPT-2's Conv1D: addmm(bias, x, W) with W stored (in, out)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        size = x.size()[:-1] + (self.weight.shape[1],)  # a read of the weight's shape, not of its values
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size)


def test_dynamic_mode_quantizes_addmm_layers_stored_in_by_out(tmp_path):
    """A layer computed as addmm(bias, x, W) with W stored (in, out), as GPT-2's Conv1D: int8 weights per output
    column in dynamic mode, on ORT's integer kernels; static mode leaves it float and says so."""

    model = nn.Sequential(Conv1DLike(32, 64), nn.GELU(), Conv1DLike(64, 16)).eval()
    x = torch.randn(4, 7, 32)
    result = fxc.compile(model, (x,), [{"pass": "quantize", "mode": "dynamic"}])
    assert result.history[1].stats["weights"] == 2
    path = result.export_onnx(tmp_path / "addmm.onnx")
    assert optimized_op_counts(path).get("DynamicQuantizeMatMul", 0) == 2
    with torch.no_grad():
        sim, reference = result.module(x).numpy(), model(x).numpy()
    got = run(path, (x,))[0]
    assert np.abs(got - sim).max() <= 1e-4 * np.abs(reference).max()
    assert sqnr_db(reference, sim) > 30  # int8 weights per column (per-tensor would not get there on random weights)
    static = fxc.compile(model, (x,), [{"pass": "quantize"}], calibration_data=[(x,)])
    assert any("static mode does not lower addmm" in n for n in static.history[1].notes)


class SharedAfterGelu(nn.Module):
    """An addmm layer, then one Linear called twice on GELU outputs (on inputs with a positive mean, a weight's
    rounding error shifts every output the same way)."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.act = Conv1DLike(32, 48), nn.Linear(48, 48), nn.GELU()

    def forward(self, x):
        h = self.act(self.inp(x))
        return self.shared(self.act(self.shared(h)) + h)


def test_dynamic_mode_corrects_biases_from_calibration_data(tmp_path):
    """With calibration data, dynamic mode subtracts each call's mean weight error from its bias (a shared layer's
    calls get biases of their own; addmm layers too), and ORT runs the file as the module computes it; without
    data nothing is corrected."""
    torch.manual_seed(0)
    model = SharedAfterGelu().eval()
    x, calib = torch.randn(4, 16, 32) + 1, [(torch.randn(4, 16, 32) + 1,) for _ in range(8)]
    with torch.no_grad():
        reference = model(x)
    sqnr, stats = {}, {}
    for on in (False, True):
        result = fxc.compile(model, (x,), [{"pass": "quantize", "mode": "dynamic", "weight_bits": 4,
                                            "bias_correction": on}], calibration_data=calib)
        stats[on] = result.history[-1].stats["biases_corrected"]
        with torch.no_grad():
            sim = result.module(x)
        sqnr[on] = sqnr_db(reference, sim)
    assert stats == {False: 0, True: 3}
    assert sqnr[True] > sqnr[False] + 1.0, sqnr
    got = run(result.export_onnx(tmp_path / "corrected.onnx"), (x,))[0]
    assert np.abs(got - sim.numpy()).max() <= 1e-4 * reference.abs().max().item()
    plain = fxc.compile(model, (x,), [{"pass": "quantize", "mode": "dynamic"}])
    assert plain.history[-1].stats["biases_corrected"] == 0


class _Tokens(nn.Module):
    def __init__(self, vocab=4096, width=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(2048, width)
        self.kind = nn.Embedding(2, width)  # a token-type table: too small to store in int8
        self.fc = nn.Linear(width, 8)

    def forward(self, ids):
        return self.fc(self.emb(ids) + self.pos(torch.arange(ids.shape[1])) + self.kind(ids % 2))


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_embedding_tables_are_stored_in_int8_and_only_the_rows_read_are_dequantized(mode, tmp_path):
    """As ORT's quantize_dynamic stores them: the file holds int8 tables (a quarter of their bytes), ORT gathers
    int8 rows, and the outputs equal PyTorch's; a scale per row keeps the tables' own error tiny.  A table of fewer
    than 65536 values stays float and is named."""
    torch.manual_seed(0)
    model = _Tokens().eval()
    ids = torch.randint(0, 4096, (3, 12))
    calib = [(torch.randint(0, 4096, (3, 12)),) for _ in range(4)]
    result = fxc.compile(model, (ids,), [{"pass": "quantize", "mode": mode}], calibration_data=calib)
    lowered = [n for n in result.module.graph.nodes if n.target is quantized_embedding]
    assert len(lowered) == 2 and result.module.qparams.emb_table_int8.dtype == torch.int8
    assert "left float: kind: a table of 64 values stays float" in result.history[1].notes[0]
    table = model.emb.weight.detach()
    rows = result.module.qparams.emb_table_int8.float() * result.module.qparams.emb_table_scale
    assert sqnr_db(table.numpy(), rows.numpy()) > 40
    path = result.export_onnx(tmp_path / "tokens.onnx")
    assert path.stat().st_size < 0.4 * 4 * (table.numel() + model.pos.weight.numel())
    with torch.no_grad():
        sim = result.module(ids).numpy()
    assert np.abs(run(path, (ids,))[0] - sim).max() <= 1e-5 * np.abs(sim).max()
    loaded = fxc.load(result.save(tmp_path / "tokens.pt"))
    assert torch.equal(loaded(ids), result.module(ids))
    kept = fxc.compile(model, (ids,), [{"pass": "quantize", "mode": mode, "exclude": ["pos"]}],
                       calibration_data=calib)
    assert sum(n.target is quantized_embedding for n in kept.module.graph.nodes) == 1
    assert any("pos: excluded" in n for n in kept.history[1].notes)
