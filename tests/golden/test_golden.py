"""Every golden model end to end: traces, folds exactly, exports and matches in ONNX Runtime; the trained ones
also reach their recorded accuracies, in fp32 and through ONNX Runtime's own INT8 quantizer.

This file is the frame later capabilities fill in: add a recipe to RECIPES_EXACT (or a bounded check beside
test_fold_matches_fp32) and every golden model runs it.
"""
import json

import pytest
import torch
from fxcompress.golden_models import EXPECTED, GOLDEN

import fxcompress as fxc
from fxcompress.export import max_abs_diff

IMAGENET = sorted(n for n, s in GOLDEN.items() if not s.trained)
DIGITS = sorted(n for n, s in GOLDEN.items() if s.trained)
HEAVY = {"vgg11_bn", "unet", "resnext50", "resnet50", "densenet121"}  # their ORT export checks run with -m slow
PUBLISHED_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872,
                    "vgg11_bn": 132_868_840, "resnext50": 25_028_904, "densenet121": 7_978_856}
RECIPES_EXACT = {"fold_bn": [{"pass": "fold_bn"}]}
# DenseNet is pre-activation: each layer's first BN follows the concat, each transition's and the final BN a
# concat too (58 layers + 3 transitions + 1 final = 62); all other golden BatchNorms follow a conv.
PRE_ACTIVATION_BN = {"densenet121": 62}


def _expected() -> dict:
    return json.loads(EXPECTED.read_text())


@pytest.fixture(scope="module", params=sorted(GOLDEN))
def golden(request):
    model, inputs = fxc.golden.load(request.param)
    return request.param, model, inputs


@pytest.mark.parametrize("recipe", sorted(RECIPES_EXACT))
def test_fold_matches_fp32(golden, recipe):
    name, model, inputs = golden
    result = fxc.compile(model, inputs, RECIPES_EXACT[recipe])  # the manager's EXACT check runs inside
    with torch.no_grad():
        got, want = result.module(*inputs), model(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5 * float(want.abs().max()))
    stats = result.history[0].stats
    unfoldable = PRE_ACTIVATION_BN.get(name, 0)  # BN after a concat or pooling: no producer to fold into
    assert stats["bn_folded"] == stats["bn_seen"] - unfoldable
    assert stats["skipped_no_foldable_producer"] == unfoldable
    if name in PUBLISHED_PARAMS:
        assert result.before.params == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in sorted(GOLDEN)])
def test_fp32_export_matches_in_ort(name, tmp_path):
    model, inputs = fxc.golden.load(name)
    path = fxc.export_onnx(model, inputs, tmp_path / f"{name}.onnx")
    batch = tuple(torch.cat([t, t.flip(0) * 0.5]) for t in inputs)  # batch 2: the batch axis is dynamic
    assert max_abs_diff(model, path, batch) <= 1e-4


@pytest.mark.parametrize("name", DIGITS)
def test_trained_accuracy_is_as_recorded(name):
    model, _ = fxc.golden.load(name)
    recorded = _expected()[name]["fp32_accuracy"]
    images, labels = fxc.golden.digits("test", hard=GOLDEN[name].hard)
    with torch.no_grad():
        correct = int((model(images).argmax(1) == labels).sum())
    accuracy = 100.0 * correct / len(labels)
    assert correct == round(recorded["test"] * len(labels) / 100.0)
    if GOLDEN[name].hard:
        assert 75.0 <= accuracy <= 95.0
    else:
        assert accuracy >= 97.0


@pytest.mark.parametrize("name", DIGITS)
def test_ort_int8_baseline_builds_and_matches_record(name):
    from fxcompress.bench.runner import ort_int8_accuracy

    result = ort_int8_accuracy(name, "MinMax", 128)
    assert result["accuracy"] == pytest.approx(_expected()[name]["ort_int8_minmax_test_accuracy"], abs=0.5)


def test_every_trained_model_is_recorded():
    assert sorted(_expected()) == DIGITS


@pytest.mark.slow
@pytest.mark.parametrize("name", DIGITS)
def test_retraining_from_the_seed_reproduces_the_accuracy(name, tmp_path, monkeypatch):
    import fxcompress.golden_models.train as train

    monkeypatch.setattr(train, "WEIGHTS", tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as train.py trains
    try:
        accuracy = train.train(name, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    assert accuracy["test"] == pytest.approx(_expected()[name]["fp32_accuracy"]["test"], abs=1.0)


def test_redrawn_validation_adds_fresh_hard_images_only_for_hard_models(monkeypatch):
    """``accuracy(..., redraws=k)`` scores 1 + k hardenings of the split: k new ones, none of them the split's own."""
    seen = []
    model, _ = fxc.golden.load("resnet20-hard-digits")

    def spy(images):
        seen.append(images)
        return model(images)

    plain = fxc.golden.accuracy("resnet20-hard-digits", "val")(spy)
    redrawn = fxc.golden.accuracy("resnet20-hard-digits", "val", redraws=2)(spy)
    val, _ = fxc.golden.digits("val", hard=True)
    assert len(seen[1]) == 3 * len(val) and torch.equal(seen[1][:len(val)], val)
    assert not torch.equal(seen[1][len(val):2 * len(val)], val)
    assert not torch.equal(seen[1][len(val):2 * len(val)], seen[1][2 * len(val):])
    assert plain != redrawn and 75.0 <= redrawn <= 95.0  # the model is as good on the redraws (hardened alike)
    fxc.golden.accuracy("resnet20-digits", "val", redraws=2)(spy)
    assert len(seen[2]) == len(fxc.golden.digits("val")[0])  # easy models: the split alone
