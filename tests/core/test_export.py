import onnx
import pytest
import torch
import torch.nn as nn
import zoo

import fxcompress as fxc
from fxcompress.export import max_abs_diff, run, session
from fxcompress.export import onnx as onnx_export


def _other_batch(inputs, batch=3):
    g = torch.Generator().manual_seed(5)
    return tuple(torch.randn((batch, *t.shape[1:]), generator=g) if t.is_floating_point()
                 else torch.randint(0, int(t.max()) + 1, (batch, *t.shape[1:]), generator=g) for t in inputs)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_every_zoo_model_exports_and_matches_in_ort(name, tmp_path):
    model, inputs = zoo.build(name)
    result = fxc.compile(model, inputs, [{"pass": "fold_bn"}])
    path = result.export_onnx(tmp_path / f"{name}.onnx")
    assert max_abs_diff(result.module, path, inputs) <= 1e-4
    assert max_abs_diff(result.module, path, _other_batch(inputs)) <= 1e-4  # the batch axis is dynamic
    proto = onnx.load(path)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2",
                                  pytest.param("resnet50", marks=pytest.mark.slow),
                                  pytest.param("vgg11_bn", marks=pytest.mark.slow)])
def test_golden_models_export_and_match_in_ort(name, tmp_path):
    model, inputs = fxc.golden.load(name)
    result = fxc.compile(model, inputs, [{"pass": "fold_bn"}])
    path = result.export_onnx(tmp_path / "m.onnx")
    assert max_abs_diff(result.module, path, _other_batch(inputs, 2)) <= 1e-4


def test_stable_names():
    model, inputs = zoo.build("splits_views")
    result = fxc.compile(model, inputs, [])
    proto = onnx.load(result.export_onnx("/dev/null" if False else _tmp("names.onnx")))
    assert [i.name for i in proto.graph.input] == ["x"]
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1"]  # logits, aux in dict order
    mha = nn.MultiheadAttention(8, 2).eval()
    x = torch.randn(4, 2, 8)
    proto = onnx.load(fxc.export_onnx(fxc.trace(mha, (x, x, x)), (x, x, x), _tmp("mha.onnx")))
    assert [i.name for i in proto.graph.input] == ["query", "key", "value"]


def _tmp(name, _dir=[]):
    import tempfile
    from pathlib import Path

    if not _dir:
        _dir.append(Path(tempfile.mkdtemp()))
    return _dir[0] / name


class FakeQuant(nn.Module):
    """What a quantized graph looks like: per-tensor activations, per-channel weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("w_scale", self.conv.weight.detach().abs().amax((1, 2, 3)) / 127)
        self.register_buffer("w_zero", torch.zeros(4, dtype=torch.int32))

    def forward(self, x):
        x = torch.fake_quantize_per_tensor_affine(x, 0.02, 128, 0, 255)
        w = torch.fake_quantize_per_channel_affine(self.conv.weight, self.w_scale, self.w_zero, 0, -128, 127)
        y = nn.functional.conv2d(x, w, self.conv.bias)
        return torch.fake_quantize_per_tensor_affine(y, 0.05, 128, 0, 255)


@pytest.mark.parametrize("exporter", ["auto", "torchscript", "dynamo"])
def test_fake_quant_exports_as_qdq(exporter, tmp_path):
    model = FakeQuant().eval()
    x = torch.rand(2, 3, 8, 8) * 4 - 2
    gm = fxc.trace(model, x)
    path = fxc.export_onnx(gm, x, tmp_path / "q.onnx", exporter=exporter)
    model_proto = onnx.load(path)
    ops = [n.op_type for n in model_proto.graph.node]
    # activations: QuantizeLinear + DequantizeLinear; the weight: an int8 initializer + DequantizeLinear; the bias:
    # an int32 initializer (scale: input scale x weight scale) + DequantizeLinear
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 4
    types = sorted(i.data_type for i in model_proto.graph.initializer if len(i.dims) == 1 and i.dims[0] == 4)
    assert onnx.TensorProto.INT32 in types
    assert any(i.data_type == onnx.TensorProto.INT8 and list(i.dims) == [4, 3, 3, 3]
               for i in model_proto.graph.initializer)
    # The float conv before the output's fake-quant accumulates in another order in ORT, so a value lying on a
    # rounding boundary may land one output step (0.05) away; everything else is identical.
    other = torch.rand(5, 3, 8, 8) * 4 - 2  # dynamic batch, also through the QDQ nodes
    for inputs in (x, other):
        got = torch.from_numpy(run(path, inputs)[0])
        with torch.no_grad():
            want = gm(inputs)
        diff = (got - want).abs()
        assert got.shape == want.shape
        assert diff.max() <= 0.05 + 1e-6
        assert (diff > 1e-4).float().mean() < 0.01


def test_falls_back_to_dynamo_when_torchscript_fails(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no symbolic for this op")

    monkeypatch.setattr(onnx_export, "_torchscript", broken)
    model, inputs = zoo.build("residual")
    path = fxc.export_onnx(fxc.trace(model, inputs), inputs, tmp_path / "d.onnx")
    assert max_abs_diff(model, path, _other_batch(inputs)) <= 1e-4


def test_an_invalid_file_from_the_graph_optimizer_falls_back_to_the_unoptimized_export(tmp_path, monkeypatch):
    """The dynamo exporter's optimizer can leave a node reading a value produced nowhere (timm Gemma4): the checker
    rejects that file and the export runs again without the optimizer."""
    exporter, calls = onnx_export._dynamo, []

    def broken(*args, **kwargs):
        raise RuntimeError("no symbolic for this op")

    def dropping(wrapper, inputs, path, *rest, optimize=True):
        calls.append(optimize)
        exporter(wrapper, inputs, path, *rest, optimize=optimize)
        if optimize:  # as the optimizer did: a node reads a constant that is not there
            model = onnx.load(str(path))
            model.graph.node[-1].input[0] = "dropped_constant"
            onnx.save(model, str(path))

    monkeypatch.setattr(onnx_export, "_torchscript", broken)
    monkeypatch.setattr(onnx_export, "_dynamo", dropping)
    model, inputs = zoo.build("residual")
    path = fxc.export_onnx(fxc.trace(model, inputs), inputs, tmp_path / "d.onnx")
    assert calls == [True, False]
    assert max_abs_diff(model, path, _other_batch(inputs)) <= 1e-4


def test_a_model_over_the_protobuf_limit_keeps_its_tensors_in_one_file_beside_it(tmp_path, monkeypatch):
    """Over 2 GB the TorchScript exporter writes one file per tensor beside the .onnx; the export gathers them into
    ``name.onnx.data`` (the limit lowered here, so that a small model takes that path) and removes the scattered
    ones."""
    exporter = onnx_export._torchscript

    def scattering(wrapper, inputs, path, *rest):
        exporter(wrapper, inputs, path, *rest)
        onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=0)

    monkeypatch.setattr(onnx_export, "_torchscript", scattering)
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 2**24 + 1000)
    model, inputs = zoo.build("residual")
    path = fxc.export_onnx(model, inputs, tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert max_abs_diff(model, path, _other_batch(inputs)) <= 1e-4


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_the_file_carries_the_shapes_of_its_values(exporter, tmp_path):
    """Without value shapes ORT's memory planner cannot run an elementwise op in place (a T5 FFN's ReLU took twice
    as long): every intermediate value of the file has its shape, the batch axis symbolic."""
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    path = fxc.export_onnx(fxc.trace(model, torch.randn(2, 8)), torch.randn(2, 8), tmp_path / "m.onnx",
                           exporter=exporter)
    graph = onnx.load(str(path)).graph
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    relu = next(n for n in graph.node if n.op_type == "Relu")
    for value in (relu.input[0], relu.output[0]):  # the batch axis a symbol (the dynamo exporter names its own)
        assert isinstance(shapes[value][0], str) and shapes[value][1] == 32
    assert max_abs_diff(model, path, (torch.randn(5, 8),)) <= 1e-5


def test_a_residual_add_before_a_layer_norm_keeps_its_shapes_out_of_the_file(tmp_path):
    """With them, ORT fuses add and norm into SkipLayerNormalization where its own inference cannot tell the
    shapes (a base-width BERT's residual adds, after reshapes by traced sizes), several times slower on its CPU
    provider (python -m fxcompress.bench.hf_int8)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm = nn.Linear(16, 16), nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(x + torch.relu(self.fc(x)))

    model, x = Block().eval(), torch.randn(2, 5, 16)
    path = fxc.export_onnx(fxc.trace(model, x), x, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    norm = next(n for n in graph.node if n.op_type == "LayerNormalization")
    add = next(n for n in graph.node if n.output[0] == norm.input[0])
    known = {v.name for v in graph.value_info}
    assert add.output[0] not in known and not known & set(add.input)
    relu = next(n for n in graph.node if n.op_type == "Relu")
    assert relu.input[0] in known
    assert max_abs_diff(model, path, (torch.randn(3, 5, 16),)) <= 1e-5


def test_export_failure_names_both_exporters(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op foo")

    monkeypatch.setattr(onnx_export, "_torchscript", broken)
    monkeypatch.setattr(onnx_export, "_dynamo", broken)
    model, inputs = zoo.build("residual")
    with pytest.raises(fxc.ExportError, match="torchscript: RuntimeError: unsupported op foo") as err:
        fxc.export_onnx(model, inputs, tmp_path / "x.onnx")
    assert "dynamo: RuntimeError" in str(err.value)


def test_non_tensor_output_is_an_export_error(tmp_path):
    class Shape(nn.Module):
        def forward(self, x):
            return x * 2, x.shape[0]

    with pytest.raises(fxc.ExportError, match="returns a int"):
        fxc.export_onnx(Shape(), torch.randn(2, 3), tmp_path / "s.onnx")


def test_export_does_not_change_training_flag(tmp_path):
    model, inputs = zoo.build("residual")
    model.train()
    fxc.export_onnx(model, inputs, tmp_path / "t.onnx")
    assert model.training and model.a[1].training


def test_session_threads_are_explicit(tmp_path):
    model, inputs = zoo.build("residual")
    path = fxc.export_onnx(model, inputs, tmp_path / "s.onnx")
    sess = session(path, threads=2)
    assert sess.get_session_options().intra_op_num_threads == 2
    assert run(sess, inputs)[0].shape == (2, 10)


def test_unknown_exporter(tmp_path):
    model, inputs = zoo.build("residual")
    with pytest.raises(fxc.ExportError, match="exporter must be one of"):
        fxc.export_onnx(model, inputs, tmp_path / "e.onnx", exporter="tflite")


def test_dynamo_export_traces_a_batch_of_two_where_the_example_has_one():
    import torch.nn as nn

    from fxcompress.export import onnx as E

    x = torch.randn(1, 4)
    two = E._two_samples(nn.Linear(4, 2), (x,), ["x"], {"x": {0: "batch"}})
    assert two[0].shape == (2, 4) and torch.equal(two[0][1], x[0])  # torch.export keeps a size of 2 symbolic
    assert E._two_samples(nn.Linear(4, 2), (x,), ["x"], None)[0] is x  # a static batch stays as given

    class OneSample(nn.Module):
        def forward(self, t):
            return t.view(4)
    assert E._two_samples(OneSample(), (x,), ["x"], {"x": {0: "batch"}})[0] is x
