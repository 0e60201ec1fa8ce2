"""gradual_prune: the AGP schedule; channel granularity on several architectures (masks grow along the ramp, a
following remove_channels gives the same outputs); level granularity (per-layer and global sparsity, zeros kept by
later training); errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import zoo
from fxcompress.passes.pruning.gradual_prune import agp

import fxcompress as fxc
from fxcompress.errors import PassError, RecipeError


def _data(model, example, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn((4, *example[0].shape[1:]), generator=g)
        with torch.no_grad():
            y = model(x)
        batches.append((x, y + 0.1 * torch.randn(y.shape, generator=g)))
    return batches


def _mse(out, target):
    return F.mse_loss(out, target)


def test_agp_is_cubic_from_initial_to_target():
    values = [agp(t, 100, 0.1, 0.6, 0.2, 0.8) for t in range(101)]
    assert values[0] == values[20] == 0.1 and values[80] == values[100] == pytest.approx(0.6)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[50] == pytest.approx(0.6 + (0.1 - 0.6) * (1 - 0.5) ** 3)
    assert values[30] - values[20] > values[80] - values[70]  # fast first, slow last


@pytest.mark.parametrize("name", ["residual", "concat", "grouped_depthwise", "unet", "functional", "shared_multi_user"])
def test_channel_masks_grow_then_remove_channels_gives_the_same_outputs(name):
    model, example = zoo.build(name)
    data = _data(model, example)
    steps = [{"pass": "propagate_dependencies"},
             {"pass": "gradual_prune", "target": 0.5, "epochs": 3, "lr": 1e-3, "loss": _mse, "frequency": 2}]
    masked = fxc.compile(model, example, steps, train_data=data)
    stats = masked.history[-1].stats
    assert stats["updates"] >= 3 and stats["schedule"] == sorted(stats["schedule"])
    assert stats["schedule"][-1] == pytest.approx(0.5) and stats["sparsity"] > 0.3
    inner = masked.history[-1].inner  # every update ran select_channels + remove_channels through the manager
    assert [r.name for r in inner] == ["select_channels", "remove_channels"] * stats["updates"]
    assert all(r.error == 0.0 for r in inner if r.name == "select_channels")  # checked against the stage
    assert [r.name for r in masked.history] == ["propagate_dependencies", "gradual_prune"]
    removed = fxc.compile(model, example, steps + [{"pass": "remove_channels"}], train_data=data)
    assert removed.after.params < masked.after.params
    x = data[0][0]
    with torch.no_grad():
        torch.testing.assert_close(removed.module(x), masked.module(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_level_pruning_reaches_its_sparsity_and_later_training_keeps_the_zeros(scope):
    model, example = zoo.build("residual")
    data = _data(model, example)
    steps = [{"pass": "gradual_prune", "granularity": "level", "target": 0.6, "scope": scope, "epochs": 2,
              "lr": 1e-3, "loss": _mse},
             {"pass": "finetune", "epochs": 1, "lr": 1e-2, "loss": _mse}]
    result = fxc.compile(model, example, steps, train_data=data)
    assert result.history[0].stats["sparsity"] == pytest.approx(0.6, abs=0.01)
    convs = [m for m in result.module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zeros = [float((m.weight == 0).float().mean()) for m in convs]
    total = sum(int((m.weight == 0).sum()) for m in convs) / sum(m.weight.numel() for m in convs)
    assert total == pytest.approx(0.6, abs=0.01)  # still zero after finetune
    if scope == "local":
        assert all(z == pytest.approx(0.6, abs=0.05) for z in zeros), zeros
    else:
        assert max(zeros) - min(zeros) > 0.05  # one threshold: layers differ


def test_gradual_prune_errors():
    model, example = zoo.build("residual")
    data = _data(model, example)
    with pytest.raises(PassError, match="propagate_dependencies first"):
        fxc.compile(model, example, [{"pass": "gradual_prune", "loss": _mse}], train_data=data)
    for options, match in [({"target": 1.0}, "target must be"), ({"granularity": "block"}, "granularity"),
                           ({"initial": 0.6, "target": 0.5}, "must not exceed"), ({"start": 0.8, "end": 0.5}, "start"),
                           ({"frequency": 0}, "frequency"), ({"criterion": "l3"}, "criterion")]:
        with pytest.raises(RecipeError, match=match):
            fxc.passes.PASSES["gradual_prune"](**options)
