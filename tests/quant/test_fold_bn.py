import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zoo
from fxcompress.passes import PASSES
from fxcompress.passes.quant.fold_bn import SKIP_REASONS
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcompress as fxc

FOLD = [{"pass": "fold_bn"}]


def _assert_exact(result, model, inputs):
    """rtol 1e-5, atol 1e-5 x the output's scale: the fold contract, checked here outside the manager too."""
    with torch.no_grad():
        got, want = result.module(*inputs), model(*inputs)
    got_leaves, want_leaves = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


def _bn_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is F.batch_norm
            or n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)]


EXPECTED = {  # name: (folded, {skip reason: count})
    "residual": (5, {}),
    "concat": (5, {}),
    "grouped_depthwise": (4, {}),
    "transposed": (3, {}),
    "unet": (5, {}),
    "dims_1d_3d": (2, {}),
    "shared_multi_user": (1, {"skipped_shared_module": 2, "skipped_multi_user": 1}),
    "functional": (1, {"skipped_no_foldable_producer": 1}),
    "linear_bn": (1, {"skipped_channel_layout": 1}),
    "attention": (0, {}),
    "splits_views": (1, {}),
    "shufflenet": (13, {}),
    "recurrent": (0, {"skipped_no_foldable_producer": 1}),
}


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_fold_is_exact_and_counts_every_batchnorm(name):
    model, inputs = zoo.build(name)
    result = fxc.compile(model, inputs, FOLD)
    _assert_exact(result, model, inputs)
    folded, skips = EXPECTED[name]
    stats = result.history[0].stats
    assert stats["bn_folded"] == folded
    assert {k: v for k, v in stats.items() if k.startswith("skipped_") and v} == skips
    assert stats["bn_seen"] == folded + sum(skips.values())
    assert len(_bn_nodes(result.module)) == sum(skips.values())
    assert result.history[0].modified == (folded > 0)
    assert len(result.history[0].notes) == sum(skips.values())


def test_folded_modules_are_gone_and_biases_created():
    model, inputs = zoo.build("residual")
    result = fxc.compile(model, inputs, FOLD)
    names = dict(result.module.named_modules())
    assert "a.1" not in names and "stem.1" not in names
    assert result.module.get_submodule("a.0").bias is not None  # conv had bias=False
    changes = result.history[0].param_changes
    assert "+a.0.bias [8]" in changes and "-a.1.running_mean [8]" in changes
    assert not _bn_nodes(result.module)


def test_multi_user_conv_is_left_alone_and_named_in_notes():
    model, inputs = zoo.build("shared_multi_user")
    result = fxc.compile(model, inputs, FOLD)
    assert isinstance(result.module.get_submodule("bn"), nn.BatchNorm2d)
    assert result.module.get_submodule("conv").bias is model.conv.bias or torch.equal(
        result.module.get_submodule("conv").bias, model.conv.bias)
    notes = result.history[0].notes
    assert any(n.startswith("bn: multi user") and "zoo.py" in n for n in notes)
    assert sum("shared module" in n for n in notes) == 2


def test_training_mode_bn_is_skipped():
    model, inputs = zoo.build("residual")
    model.b.train()  # one BatchNorm normalising with batch statistics
    pm = fxc.PassManager(FOLD)
    ctx = pm.context(model, inputs)  # no eval_mode: flags kept as given
    record = pm.step(ctx)
    assert record.stats["skipped_training_bn"] == 1 and record.stats["bn_folded"] == 4
    assert isinstance(ctx.gm.get_submodule("b.1"), nn.BatchNorm2d)


def test_functional_batch_norm_in_training_mode_and_without_stats_is_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x):
            x = F.batch_norm(self.c1(x), None, None, training=True)
            return self.bn(self.c2(x))

    result = fxc.compile(M().eval(), torch.randn(2, 3, 4, 4), FOLD)
    stats = result.history[0].stats
    assert stats["skipped_training_bn"] == 1 and stats["skipped_no_running_stats"] == 1
    assert not result.history[0].modified


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "vgg11_bn"])
def test_golden_imagenet_nets_fold_exactly(name):
    model, inputs = fxc.golden.load(name)
    zoo.randomize_bn(model, seed=7)
    result = fxc.compile(model, inputs, FOLD)
    _assert_exact(result, model, inputs)
    stats = result.history[0].stats
    assert stats["bn_folded"] == stats["bn_seen"] > 0
    assert result.before.params == sum(p.numel() for p in model.parameters())


def test_vgg_style_net_folds_exactly():
    from fxcompress.golden_models.vgg import VGG

    torch.manual_seed(0)
    model = zoo.randomize_bn(VGG("A", num_classes=10, width=0.25, hidden=64, pool=1), seed=3).eval()
    inputs = (torch.randn(2, 3, 32, 32),)
    result = fxc.compile(model, inputs, FOLD)
    _assert_exact(result, model, inputs)
    assert result.history[0].stats["bn_folded"] == 8


def test_fold_bn_has_no_options_and_is_registered():
    assert PASSES["fold_bn"].option_names() == ()
    assert PASSES["fold_bn"].contract is fxc.Contract.EXACT
    assert set(SKIP_REASONS) < set(fxc.compile(*zoo.build("residual"), FOLD).history[0].stats)


@st.composite
def conv_stacks(draw):
    """Random stacks of conv/convtranspose/linear (dims 1-3, groups, bias) each followed by BatchNorm."""
    dims = draw(st.sampled_from([1, 2, 3]))
    layers, channels = [], draw(st.sampled_from([2, 4]))
    for _ in range(draw(st.integers(1, 4))):
        groups = draw(st.sampled_from([1, 2]))
        cout = draw(st.sampled_from([2, 4, 6]))
        kind = draw(st.sampled_from(["conv", "transpose"]))
        bias = draw(st.booleans())
        cls = {("conv", 1): nn.Conv1d, ("conv", 2): nn.Conv2d, ("conv", 3): nn.Conv3d,
               ("transpose", 1): nn.ConvTranspose1d, ("transpose", 2): nn.ConvTranspose2d,
               ("transpose", 3): nn.ConvTranspose3d}[kind, dims]
        layers += [cls(channels, cout, 3, padding=1, groups=groups, bias=bias),
                   {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](cout, affine=draw(st.booleans())),
                   nn.ReLU()]
        channels = cout
    head = []
    if draw(st.booleans()):
        head = [nn.Flatten(), nn.Linear(channels * 4 ** dims, 5), nn.BatchNorm1d(5)]
    return nn.Sequential(*layers, *head), (2, layers[0].in_channels, *([4] * dims)), draw(st.integers(0, 10_000))


@settings(max_examples=25, deadline=None)
@given(conv_stacks())
def test_fold_is_exact_on_random_conv_stacks(case):
    model, shape, seed = case
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and not isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_parameters()
    model = zoo.randomize_bn(model, seed).eval()
    inputs = (torch.randn(shape),)
    result = fxc.compile(model, inputs, FOLD)
    _assert_exact(result, model, inputs)
    stats = result.history[0].stats
    assert stats["bn_folded"] == stats["bn_seen"]
    assert not _bn_nodes(result.module)


def test_float32_rounding_noise_is_told_apart_from_a_change():
    """ResNet-50's logits carry ~2e-5 of float32 rounding noise; folding is judged again in float64."""
    model, inputs = fxc.golden.load("resnet50")
    result = fxc.compile(model, inputs, FOLD)
    record = result.history[0]
    assert record.error > 1e-5  # float32 vs float32: above the tolerance, from rounding alone
    note = next(n for n in record.notes if n.startswith("numeric check"))
    error64 = float(note.rsplit(" ", 1)[1])
    assert error64 < 1e-5
