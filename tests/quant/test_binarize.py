"""binarize: binary and ternary weights (BWN / TWN scaling per output channel), 8-bit first and last layers, XNOR
inputs, the straight-through estimator with clipping, training, save/load, and the compact ONNX file."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import zoo

import fxcompress as fxc
from fxcompress.errors import InputError, RecipeError
from fxcompress.export.ort import run as ort_run
from fxcompress.lowbit import LowBitLayer


def _binarize(model, inputs, **options):
    return fxc.compile(model, inputs, [{"pass": "binarize", **options}])


def _low(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, LowBitLayer)}


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3),
                        nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        net[-1].weight.mul_(50)  # logits of a trained classifier's size, not a random init's
        for m in net.modules():  # BatchNorm statistics of the data, as a trained model has them
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        net.train()(torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(9)))
    return net.eval(), (torch.randn(2, 3, 8, 8),)


@pytest.mark.parametrize("weights", ["binary", "ternary"])
def test_weights_take_two_or_three_values_per_channel_first_and_last_at_8_bits(weights):
    model, inputs = _net()
    result = _binarize(model, inputs, weights=weights)
    layers = _low(result.module)
    assert [m.mode for m in layers.values()] == ["int8", weights, weights, weights, "int8"]
    for m in layers.values():
        w = m.dense_weight().detach().reshape(m.out_channels, -1)
        for row, v in zip(w, m.latent.detach().reshape(m.out_channels, -1)):
            values = row.unique()
            if m.mode == "binary":
                assert len(values) <= 2 and torch.allclose(values.abs(), v.abs().mean().expand_as(values))
                assert torch.equal(row > 0, v >= 0)
            elif m.mode == "ternary":
                assert len(values) <= 3 and 0 in values.tolist()
            else:
                assert len(values) <= 255 and (row - v).abs().max() <= v.abs().max() / 127 / 2 + 1e-7
    stats = result.history[-1].stats
    assert (stats["layers_binarized"], stats["layers_8bit"]) == (3, 2)
    if weights == "ternary":
        assert 0.2 < stats["zero_share"] < 0.8
    everything = _binarize(model, inputs, weights=weights, keep_first_last=False)
    assert {m.mode for m in _low(everything.module).values()} == {weights}


def test_straight_through_gradient_with_clipping_reaches_the_latent_weights():
    layer = nn.Linear(6, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(-1, 1, 24).reshape(4, 6))
    low = LowBitLayer(layer, "binary")
    assert low.clip == 1.0
    with torch.no_grad():
        low.latent[0, 0] = 3.0  # beyond the clip: no gradient
    low.train()
    low(torch.ones(2, 6)).sum().backward()
    grad = low.latent.grad
    assert grad[0, 0] == 0 and bool((grad.reshape(-1)[1:] == 2.0).all())  # d(sum)/dW = number of rows of ones


def test_binary_inputs_are_signs_scaled_by_the_mean_magnitude():
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    low = LowBitLayer(conv, "binary", binary_input=True).eval()
    x = torch.randn(1, 2, 5, 5)
    low.centre(x)
    shifted = x - x.mean((0, 2, 3)).reshape(1, -1, 1, 1)
    signs = torch.where(shifted >= 0, 1.0, -1.0)
    k = torch.nn.functional.avg_pool2d(shifted.abs().mean(1, keepdim=True), 3, 1, 1, count_include_pad=True)
    want = torch.nn.functional.conv2d(signs, low.dense_weight(), padding=1) * k
    torch.testing.assert_close(low(x), want)


@pytest.mark.parametrize("name", ["residual", "grouped_depthwise", "dims_1d_3d", "attention", "concat"])
def test_zoo_models_binarize_and_run_the_same_in_ort(name, tmp_path):
    model, inputs = zoo.build(name)
    result = _binarize(model, inputs, weights="ternary", keep_first_last=False)
    path = fxc.export_onnx(result.module, inputs, tmp_path / "m.onnx")
    with torch.no_grad():
        want = [t.numpy() for t in torch.utils._pytree.tree_leaves(result.module(*inputs))]
    for a, b in zip(want, ort_run(path, inputs)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(float(np.abs(a).max()), 1.0))


def test_binary_file_is_ten_times_smaller_and_xnor_runs_in_ort(tmp_path):
    model, inputs = _net()
    dense = fxc.export_onnx(model, inputs, tmp_path / "fp32.onnx")
    binary = fxc.export_onnx(_binarize(model, inputs, keep_first_last=False).module, inputs, tmp_path / "b.onnx")
    assert os.path.getsize(binary) * 10 < os.path.getsize(dense)
    xnor = _binarize(model, inputs, activations="binary")
    path = fxc.export_onnx(xnor.module, inputs, tmp_path / "x.onnx")
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = xnor.module(x).numpy()
    got = ort_run(path, (x,))[0]
    # a sign can flip where a value sits within float rounding of its threshold: predictions agree, not every bit
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95


@pytest.mark.parametrize("weights", ["binary", "ternary"])
def test_training_the_latent_weights_brings_the_outputs_back_towards_the_float_model(weights):
    model, inputs = _net()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(8)]
    with torch.no_grad():
        data = [(x, model(x)) for x in xs]  # the float model's outputs as targets
    x = torch.cat(xs)
    before = _binarize(model, inputs, weights=weights)
    after = fxc.compile(model, inputs, [{"pass": "binarize", "weights": weights},
                                        {"pass": "finetune", "epochs": 6, "lr": 3e-4, "optimizer": "adam",
                                         "loss": "mse"}], train_data=data)
    with torch.no_grad():
        ref = model(x)
        gap = [float((m(x) - ref).square().mean()) for m in (before.module, after.module)]
    assert gap[1] < 0.4 * gap[0]
    assert set(_low(after.module)) == set(_low(before.module))


def test_save_and_load_round_trip_bit_for_bit(tmp_path):
    model, inputs = _net()
    result = _binarize(model, inputs, activations="binary")
    loaded = fxc.load(result.save(tmp_path / "b.fxc"))
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), result.module(*inputs))


def test_quantize_after_binarize_runs_the_binary_weights_as_int8():
    model, inputs = _net()
    binary = _binarize(model, inputs)
    calibration = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    int8 = fxc.compile(binary.module, inputs, [{"pass": "quantize"}], calibration_data=calibration)
    assert not _low(int8.module)
    assert int8.history[1].stats["codebook_layers_expanded"] == 5


def test_bad_options_and_models_are_clear_errors():
    model, inputs = _net()
    for options, words in (({"weights": "quaternary"}, "weights"), ({"activations": "int4"}, "activations"),
                           ({"threshold": 1.5}, "threshold"), ({"exclude": "nothing"}, "nothing")):
        with pytest.raises(RecipeError, match=words):
            _binarize(model, inputs, **options)
    with pytest.raises(InputError, match="no Conv or Linear layer to binarize"):
        _binarize(nn.Sequential(nn.ReLU()), inputs)
    with pytest.raises(InputError, match="keep_first_last"):
        _binarize(nn.Sequential(nn.Flatten(), nn.Linear(192, 8), nn.Linear(8, 2)), inputs)
