"""The op registry: every behaviour a record names is implemented, lookups follow the class hierarchy, and a
registration changes what every pass does with the op."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxcompress.passes.pruning.lib.channel_rules import KINDS
from fxcompress.passes.pruning.remove_channels import RESIZE
from fxcompress.passes.quant.lib.quant_plan import ROLES

import fxcompress as fxc
from fxcompress import counting, ops
from fxcompress.errors import InputError
from fxcompress.lowbit import CodebookLayer

IMPLEMENTED = {"channels": KINDS, "resize": RESIZE, "quant": ROLES, "macs": counting.MAC_RULES}


@pytest.mark.parametrize("field", sorted(IMPLEMENTED))
def test_every_named_behaviour_is_implemented(field):
    named = {getattr(op, field) for op in ops.OPS.values()} - {None}
    assert named, f"no record sets {field}"
    assert named <= set(IMPLEMENTED[field]), named - set(IMPLEMENTED[field])


def test_weighted_layers_are_one_definition():
    weighted = set(ops.targets_with("weighted"))
    assert weighted == {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                        nn.Linear}
    assert set(ops.targets_with("folds_bn")) == weighted | {CodebookLayer}  # (as a per-channel scale)
    assert set(ops.targets_with("factorizes")) == {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear}


def test_lookups_follow_the_class_hierarchy_field_by_field():
    class MyConv(nn.Conv2d):
        pass

    conv = MyConv(3, 4, 3)
    assert ops.of_module(conv, "channels") == "conv" and ops.of_module(conv, "macs") == "conv_layer"
    assert ops.of_module(conv, "quant") == "conv" and ops.of_module(conv, "quant", exact=True) is None
    linear = nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4)
    assert ops.of_module(linear, "quant", exact=True) == "linear"  # its own record
    assert ops.of_module(linear, "channels") == "linear" and ops.of_module(linear, "folds_bn")  # from nn.Linear
    assert ops.of_target(torch.Tensor.relu, "activation") and ops.of_target(torch.flip, "channels") is None
    assert ops.of_target([1], "channels") is None  # an unhashable target has no record


def test_register_refuses_unknown_fields_and_contradictions(monkeypatch, request):
    monkeypatch.setattr(ops, "OPS", dict(ops.OPS))
    request.addfinalizer(ops.register)  # no targets: clears the lookup cache filled from the patched records
    with pytest.raises(InputError, match="unknown"):
        ops.register(nn.ReLU, chanels="unary")
    with pytest.raises(InputError, match="already registered"):
        ops.register(nn.ReLU, channels="broadcast")
    ops.register(nn.ReLU, channels="unary")  # the same value again is fine


class Swish(nn.Module):
    """An activation the registry does not know."""

    def forward(self, x):
        return x * torch.sigmoid(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), Swish(), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


def test_one_registration_lets_pruning_through_a_custom_module(monkeypatch, request):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    leaf = fxc.compile(model, (x,), [{"pass": "prune", "ratio": 0.5}], leaf_modules=[Swish])
    assert leaf.module.conv1.out_channels == 16  # an unknown leaf is a barrier
    assert any("Swish" in n and "channel rules" in n for h in leaf.history for n in h.notes)
    monkeypatch.setattr(ops, "OPS", dict(ops.OPS))
    request.addfinalizer(ops.register)  # no targets: clears the lookup cache filled from the patched records
    ops.register(Swish, channels="unary", activation=True)
    pruned = fxc.compile(model, (x,), [{"pass": "prune", "ratio": 0.5}], leaf_modules=[Swish])
    assert pruned.module.conv1.out_channels == 8 and pruned.module.conv2.in_channels == 8
    apoz = fxc.compile(model, (x,), [{"pass": "prune", "ratio": 0.5, "criterion": "mean_activation"}],
                       calibration_data=[torch.randn(2, 3, 8, 8)], leaf_modules=[Swish])
    select = next(h for h in apoz.history if h.name == "select_channels")
    assert select.stats["groups_scored_by_l1_fallback"] == 0  # the statistics are read after Swish


def test_mac_count_follows_the_record(monkeypatch, request):
    torch.manual_seed(0)
    gm = fxc.compile(nn.Sequential(nn.Conv2d(3, 8, 3)), (torch.randn(1, 3, 6, 6),), []).module
    macs = counting.totals(gm).macs
    assert macs == 8 * 4 * 4 * 3 * 9
    monkeypatch.setattr(ops, "OPS", dict(ops.OPS))
    request.addfinalizer(ops.register)  # no targets: clears the lookup cache, which holds the patched records
    ops.OPS[nn.Conv2d] = ops.Op(channels="conv")  # a record without MACs counts none
    ops.register(F.relu)  # clears the lookup cache
    assert counting.totals(gm).macs == 0
