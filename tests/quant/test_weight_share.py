"""weight_share: k-means and product quantization of Conv/Linear weights, plain and data-aware; the codebook layer
(gradients summed per codeword), fine-tuning, save/load, and the compact ONNX file ONNX Runtime runs."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import zoo
from fxcompress.passes.quant.lib import codebook as cb
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcompress as fxc
from fxcompress.errors import InputError, RecipeError
from fxcompress.export import max_abs_diff
from fxcompress.export.codebook import pack
from fxcompress.export.ort import run as ort_run
from fxcompress.instruments import sqnr_db
from fxcompress.lowbit import CodebookLayer


def _share(model, inputs, **options):
    return fxc.compile(model, inputs, [{"pass": "weight_share", **options}])


def _stats(result):
    return result.history[-1].stats


def _layers(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, CodebookLayer)}


def test_codebook_layer_is_its_dense_layer_and_sums_gradients_per_codeword():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2)
    found = cb.fit(conv.weight, 8, 1)
    layer = CodebookLayer(conv, found.codebook, found.codes)
    x = torch.randn(2, 4, 9, 9)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d) and dense.groups == 2 and dense.stride == (2, 2)
    torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=0)
    assert layer.dense_weight().unique().numel() <= 8
    layer(x).square().sum().backward()
    dense(x).square().sum().backward()
    per_codeword = torch.zeros(8, 1).index_add_(0, layer.codes.long(), dense.weight.grad.reshape(-1, 1))
    torch.testing.assert_close(layer.codebook.grad, per_codeword)


def test_more_bits_less_weight_error_and_exact_when_the_codebook_holds_every_value():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    errors = [cb.fit(w, 2 ** b, 1).weight_sqnr_db for b in range(1, 9)]
    assert all(b > a + 3 for a, b in zip(errors, errors[1:]))  # ~6 dB per bit for a Gaussian; at least 3
    few = torch.randint(0, 5, (16, 16)).float()
    fitted = cb.fit(few, 8, 1)
    assert fitted.weight_sqnr_db == float("inf") and len(fitted.codebook) == 5


def test_output_aware_refit_minimises_the_output_error_for_its_codes():
    """For fixed codes the refit codebook is the minimiser: no direction lowers f, and f is below plain k-means'."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 48, generator=g) + 0.05 * torch.randn(512, 48, generator=g)
    w = torch.randn(24, 48, generator=g)
    h = (x.T @ x).double()[None]
    error = cb.OutputError(w, h)
    codebook, codes = cb.kmeans(cb.blocks(w, 4).reshape(-1, 4), 16)
    best = error.refit(codebook, codes)
    value = error(best[codes].reshape(24, 48))
    assert value < error(codebook[codes].reshape(24, 48))
    for _ in range(5):
        nudged = best + 1e-3 * torch.randn(best.shape, generator=g, dtype=torch.float64)
        assert error(nudged[codes].reshape(24, 48)) >= value * (1 - 1e-9)


@pytest.mark.parametrize("d", [1, 4])
def test_data_aware_fit_beats_plain_kmeans_on_the_outputs(d):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 6, generator=g) @ torch.randn(6, 64, generator=g) + 0.1 * torch.randn(1024, 64, generator=g)
    w = torch.randn(32, 64, generator=g)
    h = (x.T @ x).double()[None]
    plain = cb.fit(w, 16, d)
    aware = cb.fit(w, 16, d, h)
    out = lambda f: sqnr_db(x @ w.T, x @ f.codebook[f.codes.reshape(-1)].reshape(32, 64).float().T)  # noqa: E731
    assert out(aware) >= out(plain) + 1.0
    assert aware.output_sqnr_db == pytest.approx(out(aware), abs=0.5)  # (f adds a small damping on the weights)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_every_zoo_model_shares_its_layers_and_runs_the_same_in_ort(name, tmp_path):
    model, inputs = zoo.build(name)
    result = _share(model, inputs, bits=3)
    stats = _stats(result)
    layers = _layers(result.module)
    assert stats["layers_shared"] == len(layers) > 0
    assert all(m.dense_weight().unique().numel() <= 8 for m in layers.values())
    if name == "transposed":
        assert stats["skipped_transposed"] >= 1
    if name == "functional":
        assert stats["skipped_functional"] >= 1
    if name == "recurrent":
        return  # (an LSTM: covered by export tests of its own)
    path = fxc.export_onnx(result.module, inputs, tmp_path / "m.onnx")
    with torch.no_grad():
        want = [t.numpy() for t in torch.utils._pytree.tree_leaves(result.module(*inputs))]
    got = ort_run(path, inputs)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(float(np.abs(a).max()), 1.0))


def test_compact_file_stores_packed_codes_and_no_dense_weight(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 6 * 6, 100))
    inputs = (torch.randn(2, 3, 8, 8),)
    dense_file = fxc.export_onnx(model, inputs, tmp_path / "dense.onnx")
    result = _share(model, inputs, bits=3)
    path = fxc.export_onnx(result.module, inputs, tmp_path / "shared.onnx")
    graph = onnx.load(str(path)).graph
    sizes = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    floats = sum(v.size for v in sizes.values() if v.dtype == np.float32)
    assert floats < 1000  # codebooks and biases only
    packed = sizes["codes.3.packed"]  # both layers' codes, 3 bit planes
    assert packed.dtype == np.uint8 and packed.shape == (3, -(-(64 * 27 + 100 * 64 * 36) // 8))
    assert os.path.getsize(path) < os.path.getsize(dense_file) * 3.5 / 32


@settings(max_examples=12, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 70), seed=st.integers(0, 2 ** 16))
def test_packing_is_bit_planes_of_the_codes(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2 ** bits, n)
    planes = pack(codes, bits)
    assert planes.shape == (bits, -(-n // 8))
    bits_out = np.unpackbits(planes, axis=1, bitorder="little")[:, :n].astype(np.int64)
    np.testing.assert_array_equal((bits_out << np.arange(bits)[:, None]).sum(0), codes)


@settings(max_examples=8, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 9), cols=st.integers(1, 13), seed=st.integers(0, 100))
def test_ort_rebuilds_the_weights_bit_for_bit(bits, rows, cols, seed, tmp_path_factory):
    torch.manual_seed(seed)
    model = nn.Linear(cols, rows)
    inputs = (torch.eye(cols),)  # the outputs are the weight's columns plus the bias
    result = _share(model, inputs, bits=bits)
    path = fxc.export_onnx(result.module, inputs, tmp_path_factory.mktemp("m") / "m.onnx")
    layer = _layers(result.module)[""] if "" in _layers(result.module) else next(iter(_layers(result.module).values()))
    want = (layer.dense_weight().T + layer.bias).detach().numpy()
    np.testing.assert_array_equal(ort_run(path, inputs)[0], want)


def test_product_quantization_blocks_and_bits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    inputs = (torch.randn(4, 8, 6, 6),)
    result = _share(model, inputs, method="pq", bits=6, block_size=8)
    stats = _stats(result)
    assert stats["bits_per_weight"] == pytest.approx(6 / 8)
    for m in _layers(result.module).values():
        assert m.codebook.shape == (64, 8) and m.codes.numel() * 8 == m.dense_weight().numel()
    assert stats["output_sqnr_db"] > 0


@pytest.mark.slow
def test_data_aware_sharing_of_a_trained_model_is_closer_on_its_outputs():
    model, inputs = fxc.golden.load("resnet20-hard-digits")
    images, _ = fxc.golden.digits("train", hard=True)
    calibration = [images[i:i + 64] for i in range(0, 128, 64)]
    plain = fxc.compile(model, inputs, [{"pass": "weight_share", "bits": 3}], calibration_data=calibration)
    aware = fxc.compile(model, inputs, [{"pass": "weight_share", "bits": 3, "data_aware": True}],
                        calibration_data=calibration)
    val, _ = fxc.golden.digits("val", hard=True)
    with torch.no_grad():
        ref = model(val)
        assert sqnr_db(ref, aware.module(val)) >= sqnr_db(ref, plain.module(val)) + 1.0
    assert _stats(aware)["min_layer_output_sqnr_db"] > 0


def test_finetuning_trains_the_centroids_and_keeps_the_codes():
    model, inputs = zoo.build("residual")
    shared = _share(model, inputs, bits=2)
    codes = {n: m.codes.clone() for n, m in _layers(shared.module).items()}
    books = {n: m.codebook.detach().clone() for n, m in _layers(shared.module).items()}
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, *model(*inputs).shape[1:], generator=g))
            for _ in range(4)]
    tuned = fxc.compile(shared.module, inputs, [{"pass": "finetune", "epochs": 1, "lr": 0.01, "loss": "mse"}],
                        train_data=data)
    after = _layers(tuned.module)
    assert set(after) == set(codes)
    assert all(torch.equal(after[n].codes, codes[n]) for n in codes)
    assert any(not torch.equal(after[n].codebook.detach(), books[n]) for n in books)


def test_save_and_load_round_trip_bit_for_bit(tmp_path):
    model, inputs = zoo.build("residual")
    result = _share(model, inputs, method="pq", bits=4, block_size=2, exclude="stem.0")
    path = result.save(tmp_path / "shared.fxc")
    loaded = fxc.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), result.module(*inputs))
    assert all(torch.equal(a.codes, b.codes) and a.codes.dtype == torch.uint8
               for a, b in zip(_layers(loaded).values(), _layers(result.module).values()))


def test_inputs_are_not_written_to():
    model, inputs = zoo.build("residual")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = inputs[0].clone()
    _share(model, inputs, bits=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and torch.equal(inputs[0], x)


def test_bad_options_and_models_are_clear_errors():
    model, inputs = zoo.build("residual")
    for options, words in (({"bits": 0}, "bits must be 1 to 8"), ({"bits": 9}, "bits must be 1 to 8"),
                           ({"centroids": 300}, "centroids must be 2 to 256"),
                           ({"bits": 4, "centroids": 16}, "not both"),
                           ({"method": "kmeans", "block_size": 4}, "use method 'pq'"),
                           ({"method": "pq", "block_size": 1}, "block_size >= 2"),
                           ({"method": "median"}, "method"), ({"bits": 2.5}, "bits"),
                           ({"exclude": ["nothing_here"]}, "nothing_here")):
        with pytest.raises(RecipeError, match=words):
            _share(model, inputs, **options)
    with pytest.raises(RecipeError, match=r"block_size 5 does not divide the rows of .*27 weights per output"):
        _share(model, inputs, method="pq", block_size=5)
    with pytest.raises(InputError, match="needs calibration data"):
        _share(model, inputs, data_aware=True)
    with pytest.raises(InputError, match="no Conv or Linear layer"):
        _share(nn.Sequential(nn.ReLU(), nn.Flatten()), inputs)


def test_weight_shared_layers_fold_into_int8_for_the_fast_variant(tmp_path):
    model, inputs = zoo.build("residual")
    shared = _share(model, inputs, bits=4)
    calibration = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    int8 = fxc.compile(shared.module, inputs, [{"pass": "quantize"}], calibration_data=calibration)
    assert not _layers(int8.module)
    with torch.no_grad():
        assert sqnr_db(shared.module(*inputs), int8.module(*inputs)) > 20
    path = fxc.export_onnx(int8.module, inputs, tmp_path / "int8.onnx")
    assert any(n.op_type in ("QLinearConv", "DequantizeLinear") for n in onnx.load(str(path)).graph.node)
    x = (torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(7)),)
    with torch.no_grad():
        out = int8.module(*x)
    step = float(out.max() - out.min()) / 255  # one output quantization step
    assert max_abs_diff(int8.module, path, x) <= 2 * step  # ORT within 2 output steps of the PyTorch module


def test_conv_padding_modes_and_transposed_convs_are_named_skips():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ConvTranspose2d(4, 4, 2),
                          nn.Conv2d(4, 2, 1))
    result = _share(model, (torch.randn(1, 3, 5, 5),), bits=2)
    stats = _stats(result)
    assert (stats["layers_shared"], stats["skipped_padding_mode"], stats["skipped_transposed"]) == (1, 1, 1)
    assert any("padding mode 'reflect'" in n for n in result.history[-1].notes)


@pytest.mark.parametrize("name", ["grouped_depthwise", "attention", "shared_multi_user", "residual"])
def test_data_aware_sharing_of_grouped_attention_and_shared_layers_beats_plain(name):
    model, inputs = zoo.build(name)
    g = torch.Generator().manual_seed(2)
    calibration = [torch.randn(inputs[0].shape, generator=g) for _ in range(4)]
    plain = _share(model, inputs, bits=3)
    aware = fxc.compile(model, inputs, [{"pass": "weight_share", "bits": 3, "data_aware": True}],
                        calibration_data=calibration)
    x = calibration[0]
    with torch.no_grad():
        ref = model(x)
        assert sqnr_db(ref, aware.module(x)) > sqnr_db(ref, plain.module(x))


def test_data_aware_sharing_fits_3d_convs_plainly_and_says_so():
    model, inputs = zoo.build("dims_1d_3d")
    result = fxc.compile(model, inputs, [{"pass": "weight_share", "bits": 3, "data_aware": True}],
                         calibration_data=[inputs[0]])
    assert result.history[-1].stats["layers_data_aware"] == 1  # the 1-d conv; the 3-d one plain
    assert any("c3.0: plain k-means" in n for n in result.history[-1].notes)


def test_a_centroid_count_that_is_no_power_of_two_stores_the_bits_it_needs(tmp_path):
    model, inputs = zoo.build("residual")
    result = _share(model, inputs, centroids=5)
    assert _stats(result)["codewords"] == 5 and _stats(result)["bits_per_weight"] == 3.0
    assert all(m.codebook.shape[0] == 5 for m in _layers(result.module).values())
    path = fxc.export_onnx(result.module, inputs, tmp_path / "m.onnx")
    assert "codes.3.packed" in {i.name for i in onnx.load(str(path)).graph.initializer}
