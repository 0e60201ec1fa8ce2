"""The ``nas`` pass: supernet training, search under a MAC budget and extraction, end to end through compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from test_elastic import Chain, _accuracy, _blobs
from zoo import randomize_bn

import fxcompress as fxc
from fxcompress.errors import InputError, RecipeError
from fxcompress.export.ort import max_abs_diff

TRAIN = {"epochs": 4, "lr": 0.05, "population": 12, "generations": 3}


def _model():
    torch.manual_seed(0)
    return randomize_bn(Chain()).eval(), (torch.randn(4, 3, 8, 8),)


@pytest.mark.parametrize("strategy", ["evolution", "anneal"])
def test_nas_extracts_a_subnet_within_its_mac_budget_that_keeps_its_accuracy(strategy, tmp_path):
    model, inputs = _model()
    train, held = _blobs()
    recipe = [{"pass": "nas", "budget": {"macs": 0.3}, "strategy": strategy, "search_steps": 60, **TRAIN}]
    result = fxc.compile(model, inputs, recipe, train_data=train, eval_fn=lambda m: _accuracy(m, held))
    stats = result.history[0].stats
    assert stats["macs"] <= 0.3 and stats["evaluations"] >= 10
    assert stats["skipped"] or any(w < full for w, full in zip(stats["widths"].values(), (16, 32, 32, 32, 32)))
    assert result.after.macs <= 0.3 * result.before.macs * 1.05  # layers' MACs within budget; adds and means extra
    assert _accuracy(result.module, held) == pytest.approx(stats["score"], abs=1e-4)
    assert _accuracy(result.module, held) >= 0.85
    assert max_abs_diff(result.module, result.export_onnx(tmp_path / "subnet.onnx"), inputs) < 1e-4


def test_a_recipe_goes_supernet_subnet_finetune_quantize():
    model, inputs = _model()
    train, held = _blobs()
    recipe = [{"pass": "nas", "budget": {"macs": 0.5}, **TRAIN}, {"pass": "finetune", "epochs": 1, "lr": 0.01},
              {"pass": "quantize"}]
    result = fxc.compile(model, inputs, recipe, train_data=train, calibration_data=[x for x, _ in train[:4]])
    assert [r.name for r in result.history][:2] == ["nas", "finetune"]
    assert _accuracy(result.module, held) >= 0.85


def test_bad_inputs_are_clear_errors():
    model, inputs = _model()
    train, _ = _blobs()
    with pytest.raises(InputError, match="train_data"):
        fxc.compile(model, inputs, [{"pass": "nas", **TRAIN}])
    for budget in ({"macs": 0.001}, {"latency": 0.01}):  # refused before any training
        with pytest.raises(RecipeError, match="below the smallest subnet's"):
            fxc.compile(model, inputs, [{"pass": "nas", "budget": budget, **TRAIN}], train_data=train)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with pytest.raises(RecipeError, match="no residual block"):
        fxc.compile(plain, inputs, [{"pass": "nas", "depth": True, **TRAIN}], train_data=train)
    with pytest.raises(RecipeError, match="no prunable channel group"):
        fxc.compile(nn.Conv2d(3, 4, 3), inputs, [{"pass": "nas", **TRAIN}], train_data=train)
    for options, match in (({"budget": {"flops": 0.5}}, "unknown budget"), ({"budget": {"macs": 2}}, "0 <"),
                           ({"budget": {"params": 0.5}}, "latency, latency_ms or macs"),
                           ({"widths": [0]}, "widths"), ({"strategy": "grid"}, "unknown strategy"),
                           ({"random_subnets": -1}, "random_subnets")):
        with pytest.raises(RecipeError, match=match):
            fxc.compile(model, inputs, [{"pass": "nas", **options}], train_data=train)


def test_nas_under_a_measured_latency_budget_is_confirmed_in_onnx_runtime(tmp_path):
    model, inputs = _model()
    train, held = _blobs()
    # batch 32: compute, not the runtime's fixed cost per run, sets the time, so that budgets mean something on a
    # shared machine
    recipe = [{"pass": "nas", "budget": {"latency": 0.7}, "batch": 32, **TRAIN, "epochs": 2}]
    result = fxc.compile(model, inputs, recipe, train_data=train, eval_fn=lambda m: _accuracy(m, held))
    stats = result.history[0].stats
    assert stats["measured_ms"] <= stats["budget_ms"] and stats["confirmations"] >= 1
    assert stats["smallest_ms"] < stats["budget_ms"] < stats["full_ms"]
    errors = sorted(abs(e) for e in stats["fit_errors"])  # one per measured subnet; a shared machine adds outliers
    assert len(errors) >= 5 and errors[len(errors) // 2] < 0.25
    assert any(n.startswith("attempt 1: predicted") for n in result.history[0].notes)


def test_depth_alone_meets_a_budget_that_widths_cannot():
    model, inputs = _model()
    train, held = _blobs()
    groups = ["stem.0", "blocks.0.0", "blocks.1.0", "blocks.2.0", "blocks.3.0"]  # every group kept whole
    recipe = [{"pass": "nas", "budget": {"macs": 0.5}, "exclude": groups, "depth": True, **TRAIN}]
    result = fxc.compile(model, inputs, recipe, train_data=train, eval_fn=lambda m: _accuracy(m, held))
    stats = result.history[0].stats
    assert stats["elastic_groups"] == 0 and stats["skipped"] and stats["macs"] <= 0.5
    assert len(list(result.module.graph.nodes)) < len(list(fxc.trace(model, inputs).graph.nodes))
    with pytest.raises(RecipeError, match="no prunable channel group"):  # the same model without depth
        fxc.compile(model, inputs, [{"pass": "nas", "budget": {"macs": 0.5}, "depth": False, "exclude": groups,
                                     **TRAIN}], train_data=train)
