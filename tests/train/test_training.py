"""Training passes: recalibrate_bn (exact running statistics, accuracy after pruning) and finetune (seeded,
deterministic, early stopping, pruning masks kept, refuses quantized modules, clear errors on bad train_data)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import zoo
from torch.nn.modules.batchnorm import _BatchNorm

import fxcompress as fxc


def _data(example, n=4, batch=8, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((batch, *example.shape[1:]), generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def _classifier():
    """A small conv classifier with BatchNorm, 10 outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    return zoo.randomize_bn(model).eval(), (torch.randn(2, 3, 8, 8),)


@pytest.mark.parametrize("name", ["residual", "concat", "grouped_depthwise", "unet"])
def test_recalibrated_statistics_are_the_inputs_mean_and_variance(name):
    model, example = zoo.build(name)
    calib = [torch.randn((4, *example[0].shape[1:]), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = fxc.compile(model, example, [{"pass": "recalibrate_bn", "batch_size": 4}], calibration_data=calib)
    gm = result.module
    probe = copy.deepcopy(gm)  # BatchNorms in train mode normalise with batch statistics, whatever their running ones
    seen: dict[str, list[torch.Tensor]] = {}
    for n, m in probe.named_modules():
        if isinstance(m, _BatchNorm):
            m.train()
            m.register_forward_pre_hook(lambda m, a, name=n: seen.setdefault(name, []).append(a[0].detach()))
    with torch.no_grad():
        for x in calib:
            probe(x)
    assert seen and result.history[-1].stats["bn_layers"] == len(seen)
    for n, xs in seen.items():
        # the average over batches of each batch's mean and unbiased variance (BatchNorm with momentum=None, as
        # torch.optim.swa_utils.update_bn); batches are equal here, so the mean is the mean over all data
        per_batch = [x.transpose(0, 1).reshape(x.shape[1], -1).double() for x in xs]
        bn = gm.get_submodule(n)
        mean = torch.stack([x.mean(1) for x in per_batch]).mean(0)
        var = torch.stack([x.var(1) for x in per_batch]).mean(0)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert bn.momentum == 0.1 and not bn.training  # restored


def test_recalibrate_bn_needs_data_and_reports_no_batchnorm():
    model, example = _classifier()
    with pytest.raises(fxc.FxCompressError, match="needs data"):
        fxc.compile(model, example, [{"pass": "recalibrate_bn"}])
    plain = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    result = fxc.compile(plain, example, [{"pass": "recalibrate_bn"}], calibration_data=[example[0]])
    assert not result.history[-1].modified and result.history[-1].stats["bn_layers"] == 0


def _weights(result):
    return {k: v.clone() for k, v in result.module.state_dict().items()}


def test_finetune_is_seeded_and_lowers_the_loss():
    model, example = _classifier()
    data = _data(example[0], n=6)
    recipe = [{"pass": "finetune", "epochs": 4, "lr": 0.05, "seed": 3}]
    a, b = (fxc.compile(model, example, recipe, train_data=data) for _ in range(2))
    assert all(torch.equal(v, _weights(b)[k]) for k, v in _weights(a).items())
    c = fxc.compile(model, example, [{"pass": "finetune", "epochs": 4, "lr": 0.05, "seed": 4}], train_data=data)
    assert any(not torch.equal(v, _weights(c)[k]) for k, v in _weights(a).items())
    losses = a.history[-1].stats["epoch_loss"]
    assert losses[-1] < losses[0]
    assert not a.module.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in _classifier()[0].state_dict().items())  # untouched


def test_patience_stops_early_and_keeps_the_best_epoch():
    model, example = _classifier()
    scores = iter([0.1, 0.9, 0.5, 0.4, 0.3, 0.2])  # before training, then one per epoch
    result = fxc.compile(model, example, [{"pass": "finetune", "epochs": 5, "patience": 2}],
                         train_data=_data(example[0]), eval_fn=lambda m: next(scores))
    stats = result.history[-1].stats
    assert stats["stopped_early"] and stats["epochs_run"] == 3 and stats["best_epoch"] == 1
    assert stats["eval"] == [0.9, 0.5, 0.4] and stats["eval_before"] == 0.1


def test_patience_keeps_the_starting_weights_when_no_epoch_beats_them():
    model, example = _classifier()
    scores = iter([0.9, 0.5, 0.4])
    result = fxc.compile(model, example, [{"pass": "finetune", "epochs": 2, "patience": 5, "lr": 0.1}],
                         train_data=_data(example[0]), eval_fn=lambda m: next(scores))
    stats = result.history[-1].stats
    assert stats["best_epoch"] == 0 and not stats["stopped_early"] and stats["epochs_run"] == 2
    trained = result.module.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(trained[k], v), k


def test_mask_mode_channels_stay_zero_through_finetune():
    model, example = zoo.build("residual")
    data = _data(example[0], classes=int(model(example[0]).shape[1]))
    recipe = [{"pass": "prune", "ratio": 0.5, "mode": "mask"}, {"pass": "finetune", "epochs": 2, "lr": 0.1}]
    result = fxc.compile(model, example, recipe, train_data=data)
    masks = result.plans["channel_masks"]
    assert masks and result.history[-1].stats["masked_tensors"] == len(masks)
    for target, mask in masks.items():
        t = result.module.get_parameter(target) if target in dict(result.module.named_parameters()) \
            else result.module.get_buffer(target)
        assert torch.all(t[mask == 0] == 0), target
    changed = [k for k, v in result.module.state_dict().items() if not torch.equal(v, model.state_dict().get(k, v))]
    assert changed  # it did train


def test_finetune_refuses_a_quantized_module():
    model, example = _classifier()
    with pytest.raises(fxc.FxCompressError, match="quantiz"):
        fxc.compile(model, example, [{"pass": "quantize"}, {"pass": "finetune"}],
                    calibration_data=[example[0]], train_data=_data(example[0]))


@pytest.mark.parametrize("data, message", [
    (None, "no train_data"),
    ([], "empty"),
    ((b for b in []), "re-iterable"),
    ([(torch.randn(4, 3, 9, 9), torch.zeros(4, dtype=torch.long))], "only the batch axis"),
    ([torch.randn(4, 3, 8, 8)], "pair"),
    ([(torch.full((4, 3, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long))], "NaN"),
])
def test_bad_train_data_is_a_clear_error(data, message):
    model, example = _classifier()
    with pytest.raises(fxc.FxCompressError, match=message):
        fxc.compile(model, example, [{"pass": "finetune"}], train_data=data)


@pytest.mark.parametrize("options", [{"epochs": 0}, {"lr": -1}, {"optimizer": "lbfgs"}, {"schedule": "warm"},
                                     {"loss": "hinge"}, {"patience": 0}, {"momentum": 1.0}])
def test_bad_finetune_options_are_recipe_errors(options):
    model, example = _classifier()
    with pytest.raises(fxc.RecipeError):
        fxc.compile(model, example, [{"pass": "finetune", **options}], train_data=_data(example[0]))


@pytest.mark.slow
def test_pruned_resnet20_recovers_with_recalibration_and_finetuning():
    """Hard digits, half the MACs pruned: recalibrating BN alone recovers most of the accuracy, five epochs of
    fine-tuning bring it back near fp32."""
    model, example = fxc.golden.load("resnet20-hard-digits")
    train, labels = fxc.golden.digits("train", hard=True)
    images, test_labels = fxc.golden.digits("test", hard=True)

    def accuracy(m):
        with torch.no_grad():
            return 100 * float((m(images).argmax(1) == test_labels).float().mean())

    batches = [(train[i:i + 64], labels[i:i + 64]) for i in range(0, len(train), 64)]
    recipe = [{"pass": "prune", "ratio": 0.3, "criterion": "l1"}, {"pass": "recalibrate_bn"},
              {"pass": "finetune", "epochs": 5, "lr": 0.02}]
    result = fxc.compile(model, example, recipe, calibration_data=[train[i:i + 64] for i in range(0, 512, 64)],
                         train_data=batches, eval_fn=accuracy)
    assert result.after.macs <= 0.5 * result.before.macs
    recal = result.history[-2].stats
    assert recal["eval_after"] > recal["eval_before"] + 30
    assert accuracy(result.module) >= accuracy(model) - 1.5


def test_slim_sparsity_training_drives_batchnorm_scales_down_for_slim_selection():
    model, example = _classifier()
    data = _data(example[0], n=6)
    recipe = lambda l1: [{"pass": "finetune", "epochs": 4, "lr": 0.05, "bn_l1": l1, "weight_decay": 0.0},  # noqa: E731
                         {"pass": "prune", "criterion": "slim", "ratio": 0.5}]
    plain = fxc.compile(model, example, recipe(0.0), train_data=data)
    sparse = fxc.compile(model, example, recipe(0.5), train_data=data)

    def gammas(history_module):
        return torch.cat([m.weight.detach().abs() for m in history_module.modules() if isinstance(m, _BatchNorm)])

    assert "bn_gamma_below_1e-2" not in plain.history[0].stats
    assert sparse.history[0].stats["bn_gamma_below_1e-2"] > 0
    assert float(gammas(sparse.module).mean()) < 0.8 * float(gammas(plain.module).mean())
    with pytest.raises(fxc.FxCompressError, match="bn_l1"):
        fxc.compile(model, example, [{"pass": "finetune", "bn_l1": -1}], train_data=data)
