"""distill: each KD variant (offline, semi-supervised, self, features) against fine-tuning without KD at equal epochs
across seeds (slow; a pruned ResNet-20 on the hard digits, few labels); what each variant records; the KD loss; the
taps leave no trace; errors."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxcompress.passes.train.lib.training import kd_loss

import fxcompress as fxc
from fxcompress.errors import InputError, RecipeError

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


SEEDS = (0, 1, 2)
FEATURES = ["layer2", ["layer3.2.conv2", "layer3.2.conv2"]]


@functools.cache
def _finetuned(labelled: int, epochs: int, seed: int) -> float:
    return _run({"pass": "finetune", "epochs": epochs, "lr": 0.02, "seed": seed}, labelled)[0]


def _gains(step: dict, labelled: int, epochs: int) -> list[float]:
    """Accuracy of ``step`` minus fine-tuning's at equal epochs, per seed."""
    return [_run(step | {"seed": s}, labelled)[0] - _finetuned(labelled, epochs, s) for s in SEEDS]


# Measured on an Intel Xeon (gains over fine-tuning, seeds 0/1/2): offline +2.5/+3.1/+1.1, semi-supervised
# +6.9/+6.1/+5.0, features +2.8/+2.2/+0.3, self -0.0/+1.1/-1.1.  The claims below hold across the seeds with a margin.
@pytest.mark.slow
@pytest.mark.parametrize("variant, step, labelled, epochs, mean_gain, worst_gain", [
    ("offline", {"pass": "distill", "epochs": 6, "lr": 0.02}, 256, 6, 1.0, 0.0),
    ("semi_supervised", {"pass": "distill", "variant": "semi_supervised", "epochs": 6, "lr": 0.02}, 256, 6, 3.0, 2.0),
    ("features", {"pass": "distill", "epochs": 6, "lr": 0.02, "alpha": 0.9, "features": FEATURES}, 256, 6, 0.5, -0.5),
    ("self", {"pass": "distill", "variant": "self", "epochs": 8, "lr": 0.02}, 512, 8, -1.0, -2.5),
])
def test_kd_variants_against_finetuning_across_seeds(variant, step, labelled, epochs, mean_gain, worst_gain):
    """Offline, semi-supervised and feature KD beat fine-tuning at equal epochs on a pruned ResNet-20 with few labels,
    on average over three seeds and by a margin; snapshot self-distillation matches it (it does not hurt)."""
    gains = _gains(step, labelled, epochs)
    assert sum(gains) / len(gains) >= mean_gain and min(gains) >= worst_gain, gains


def test_offline_kd_trains_with_its_defaults():
    accuracy, result = _run({"pass": "distill", "epochs": 1, "lr": 0.02})
    stats = result.history[-1].stats
    assert stats["variant"] == "offline" and stats["alpha"] == 0.9 and stats["steps"] == 8
    assert accuracy > 40  # from the pruned, recalibrated start (about 20 %)


def test_semi_supervised_kd_labels_the_unlabeled_data():
    _, result = _run({"pass": "distill", "variant": "semi_supervised", "epochs": 1, "lr": 0.02})
    stats = result.history[-1].stats
    assert stats["pseudo_labeled"] == stats["pseudo_kept"] == 1078 - 256


def test_semi_supervised_confidence_keeps_only_sure_pseudo_labels():
    _, result = _run({"pass": "distill", "variant": "semi_supervised", "epochs": 1, "confidence": 0.9, "lr": 0.02})
    stats = result.history[-1].stats
    assert 0 < stats["pseudo_kept"] < stats["pseudo_labeled"]


def test_self_distillation_snapshots_its_teacher_at_the_cycle_end():
    _, result = _run({"pass": "distill", "variant": "self", "epochs": 4, "lr": 0.02}, labelled=512)
    stats = result.history[-1].stats
    assert stats["self_teacher_step"] == (4 - 1) * 16 and stats["alpha"] == 0.5  # the last quarter: 1 epoch


def test_feature_distillation_connects_and_leaves_no_tap():
    _, result = _run({"pass": "distill", "epochs": 1, "lr": 0.02, "alpha": 0.9, "features": FEATURES})
    stats = result.history[-1].stats
    assert stats["feature_pairs"] == 2 and stats["feature_loss"] > 0
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
