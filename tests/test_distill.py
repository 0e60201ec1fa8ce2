"""distill: each KD variant (offline, semi-supervised, self, features) beats fine-tuning without KD at equal epochs
on a fixed seed (a pruned ResNet-20 on the hard digits, few labels); the KD loss; the taps leave no trace; errors."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompress as fxc
from fxcompress.errors import InputError, RecipeError
from fxcompress.passes.distill import kd_loss

NAME = "resnet20-hard-digits"
PRE = [{"pass": "prune", "ratio": 0.5}, {"pass": "recalibrate_bn"}]


@functools.cache
def _setting(labelled: int):
    model, example = fxc.golden.load(NAME)
    x, y = fxc.golden.digits("train", hard=True)
    train = [(x[i:i + 32], y[i:i + 32]) for i in range(0, labelled, 32)]
    unlabeled = [x[i:i + 64] for i in range(labelled, len(x), 64)]
    return model, example, train, unlabeled, fxc.golden.accuracy(NAME)


def _run(step: dict, labelled: int = 256, **kwargs):
    model, example, train, unlabeled, accuracy = _setting(labelled)
    data = {"train_data": train, "calibration_data": unlabeled} | kwargs
    result = fxc.compile(model, example, PRE + [step], **data)
    return accuracy(result.module), result


@functools.cache
def _baseline(labelled: int, epochs: int) -> float:
    return _run({"pass": "finetune", "epochs": epochs, "lr": 0.02}, labelled)[0]


def test_offline_kd_beats_finetuning_without_it():
    accuracy, result = _run({"pass": "distill", "epochs": 6, "lr": 0.02})
    stats = result.history[-1].stats
    assert stats["variant"] == "offline" and stats["alpha"] == 0.9 and stats["steps"] == 6 * 8
    assert accuracy > _baseline(256, 6) + 1.0, (accuracy, _baseline(256, 6))


def test_semi_supervised_kd_beats_the_labels_alone():
    accuracy, result = _run({"pass": "distill", "variant": "semi_supervised", "epochs": 6, "lr": 0.02})
    stats = result.history[-1].stats
    assert stats["pseudo_labeled"] == stats["pseudo_kept"] == 1078 - 256
    assert accuracy > _baseline(256, 6) + 3.0, (accuracy, _baseline(256, 6))


def test_semi_supervised_confidence_keeps_only_sure_pseudo_labels():
    _, result = _run({"pass": "distill", "variant": "semi_supervised", "epochs": 1, "confidence": 0.9, "lr": 0.02})
    stats = result.history[-1].stats
    assert 0 < stats["pseudo_kept"] < stats["pseudo_labeled"]


def test_self_distillation_beats_finetuning_without_it():
    accuracy, result = _run({"pass": "distill", "variant": "self", "epochs": 8, "lr": 0.02}, labelled=512)
    stats = result.history[-1].stats
    assert stats["self_teacher_step"] == 6 * 16 and stats["alpha"] == 0.5
    assert accuracy > _baseline(512, 8), (accuracy, _baseline(512, 8))


def test_feature_distillation_with_connectors_beats_finetuning_and_leaves_no_tap():
    accuracy, result = _run({"pass": "distill", "epochs": 6, "lr": 0.02, "alpha": 0.9,
                             "features": ["layer2", ["layer3.2.conv2", "layer3.2.conv2"]]})
    stats = result.history[-1].stats
    assert stats["feature_pairs"] == 2 and stats["feature_loss"] > 0
    assert accuracy > _baseline(256, 6) + 1.0
    gm = result.module
    assert not any("tap" in str(n.target) for n in gm.graph.nodes)
    assert not any("tap" in name for name, _ in gm.named_modules())


def test_distill_is_deterministic_and_leaves_the_model_alone():
    model, *_ = _setting(256)
    before = copy.deepcopy(model.state_dict())
    step = {"pass": "distill", "epochs": 1, "max_steps": 3, "lr": 0.02}
    a = _run(step)[1].module
    b = _run(step)[1].module
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_given_teacher_supervises():
    model, example, train, _, _ = _setting(256)
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))
    with pytest.raises(InputError, match=r"teacher \(64, 5\)|teacher.*5\)"):
        fxc.compile(model, example, [{"pass": "distill", "teacher": wrong, "max_steps": 1}], train_data=train)


def test_kd_loss_is_t_squared_kl_and_zero_on_equal_outputs():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    for T in (1.0, 4.0):
        expected = (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
        torch.testing.assert_close(kd_loss(s, t, T), expected)
        assert float(kd_loss(s, s, T)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("options, match", [
    ({"variant": "online"}, "variant must be one of"),
    ({"temperature": 0}, "temperature must be a positive"),
    ({"alpha": 1.5}, "alpha must be in"),
    ({"variant": "self", "epochs": 1}, "needs epochs >= 2"),
    ({"variant": "self", "epochs": 4, "self_epochs": 4}, "self_epochs must be"),
    ({"features": "layer1"}, "features. must be a list"),
    ({"features": [["a", "b", "c"]]}, "each features entry"),
    ({"teacher": "resnet"}, "teacher. must be a Module"),
])
def test_bad_options_are_recipe_errors(options, match):
    with pytest.raises(RecipeError, match=match):
        fxc.passes.PASSES["distill"](**options)


def test_unknown_feature_and_missing_unlabeled_data_are_clear_errors():
    model, example, train, _, _ = _setting(256)
    with pytest.raises(InputError, match=r"'layer9'.*neither a graph node nor a module"):
        fxc.compile(model, example, [{"pass": "distill", "features": [["layer9", "layer3"]], "max_steps": 1}],
                    train_data=train)
    with pytest.raises(InputError, match=r"'fc2' is not a module of the teacher"):
        fxc.compile(model, example, [{"pass": "distill", "features": [["fc", "fc2"]], "max_steps": 1}],
                    train_data=train)
    with pytest.raises(InputError, match="calibration_data"):
        fxc.compile(model, example, [{"pass": "distill", "variant": "semi_supervised"}], train_data=train)
