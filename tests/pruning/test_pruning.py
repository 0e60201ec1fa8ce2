"""Structural pruning: dependency groups, selection, removal; mask and remove agree on exact groups."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxcompress.passes.pruning.lib.channel_deps import ChannelGraph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_nets import random_nets
from zoo import ZOO, build, randomize_bn

import fxcompress as fxc
from fxcompress.instruments import relative_error
from fxcompress.modules import PrunedMultiheadAttention


def prune(model, inputs, mode="remove", **options):
    return fxc.compile(model, inputs, [{"pass": "prune", "mode": mode, **options}])


def mask_vs_remove(model, inputs, **options):
    masked = prune(model, inputs, "mask", **options)
    removed = prune(model, inputs, "remove", **options)
    with torch.no_grad():
        err = relative_error(removed.module(*inputs), masked.module(*inputs))
    return err, masked, removed


def groups(model, inputs) -> ChannelGraph:
    return ChannelGraph(fxc.trace(model, inputs))


# ---- property: random architectures ------------------------------------------------------------------------

def _check_random(net, ratio, criterion, scope):
    model, x = net
    err, masked, removed = mask_vs_remove(model, x, ratio=ratio, criterion=criterion, scope=scope)
    assert err <= 1e-5, err
    sel = removed.history[1].stats
    if sel["channels_removed"]:
        assert removed.after.params < removed.before.params
    assert masked.after.params == masked.before.params


RANDOM_CASE = dict(net=random_nets(), ratio=st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.7, 0.9]),
                   criterion=st.sampled_from(["l1", "l2", "fpgm", "random", "slim"]),
                   scope=st.sampled_from(["local", "global"]))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(**RANDOM_CASE)
def test_random_architectures_mask_equals_remove(net, ratio, criterion, scope):
    _check_random(net, ratio, criterion, scope)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(**RANDOM_CASE)
def test_random_architectures_mask_equals_remove_long(net, ratio, criterion, scope):
    _check_random(net, ratio, criterion, scope)


# ---- the zoo -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_mask_equals_remove_on_exact_groups(name):
    model, x = build(name)
    cg = groups(model, x)
    inexact = [m for g in cg.groups if g.inexact and g.n_prunable for m in g.modules]
    err, masked, removed = mask_vs_remove(model, x, ratio=0.5, exclude=inexact)
    assert err <= 1e-5, err
    assert removed.module(*x) is not None


def test_zoo_groups_found():
    expected = {"residual": {"stem.0": 8, "a.0": 8, "down.0": 16}, "concat": {"stem.0": 8, "layers.0.0": 4},
                "grouped_depthwise": {"stem.0": 16, "grouped.0": 32}, "functional": {"conv": 8, "proj": 5},
                "shared_multi_user": {"stem.0": 8}, "unet": {"e1.0": 8, "e2.0": 16, "up": 8}}
    for name, want in expected.items():
        cg = groups(*build(name))
        found = {g.name: g.size for g in cg.groups if g.n_prunable}
        for group, size in want.items():
            assert found.get(group) == size, (name, group, found)


def test_shufflenet_prunes_exactly_and_keeps_the_regrouped_channels_whole():
    """torchvision's ShuffleNet V2 unit (chunk, branch, cat, shuffle with sizes read from x.size()): the branches'
    inner widths are pruned, the channels that a shuffle and the next unit's chunk + shuffle group differently are
    left whole with the reason, and removing equals masking."""
    model, x = build("shufflenet")
    cg = groups(model, x)
    whole = [g for g in cg.groups if not g.n_prunable and any("two views group" in f for f in g.fixed)]
    assert whole
    err, masked, removed = mask_vs_remove(model, x, ratio=0.5)
    assert err <= 1e-5, err
    inner = [removed.module.get_submodule(f"stage.{i}.branch2.{j}") for i, j in ((1, 0), (2, 3))]
    assert inner[0].out_channels == 4 and inner[1].groups == 4  # inner width 8 -> 4
    assert removed.after.params < 0.8 * removed.before.params


def test_recurrent_and_unknown_ops_left_whole_with_reason():
    model, x = build("recurrent")
    result = prune(model, x, ratio=0.5)
    deps = result.history[0]
    assert deps.stats["barrier_ops"] == 1
    assert any("LSTM" in n and "recurrent" in n for n in deps.notes)

    class Flipped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = F.relu(self.a(x))
            return self.c(torch.flip(self.b(y), dims=(1,)))

    model, x = Flipped().eval(), (torch.randn(2, 3, 6, 6),)
    result = prune(model, x, ratio=0.5)
    deps, sel = result.history[0], result.history[1]
    assert any("torch.flip is not in the channel rules" in n for n in deps.notes)
    assert "b" not in sel.stats["layer_ratios"]  # b's output reaches the flip: left whole
    assert sel.stats["layer_ratios"]["a"] == 0.5
    assert result.module.b.out_channels == 8 and result.module.a.out_channels == 4
    with torch.no_grad():
        assert result.module(*x).shape == model(*x).shape


# ---- the cases other tools get wrong -------------------------------------------------------------------------

class Shuffle(nn.Module):
    def __init__(self, groups=4):
        super().__init__()
        self.g = groups
        self.a = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU())
        self.c = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, self.g, c // self.g, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.c(self.b(y))


class C2f(nn.Module):
    """YOLOv8's C2f: split a conv's output in two, chain bottlenecks on the last piece, concat everything."""

    def __init__(self, c=8, n=2):
        super().__init__()
        self.c = c
        self.cv1 = nn.Sequential(nn.Conv2d(3, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.SiLU())
        self.m = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU())
                               for _ in range(n))
        self.cv2 = nn.Conv2d((2 + n) * c, 6, 1)

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class GLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 64, 1)
        self.b = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        p, q = self.a(x).chunk(2, dim=1)
        return self.b(p * torch.sigmoid(q))


class Pixel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.up = nn.PixelShuffle(2)
        self.down = nn.PixelUnshuffle(2)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.c(self.down(F.relu(self.b(self.up(self.a(x))))))


class SplitTranspose(nn.Module):
    """EdgeNeXt's split-transpose block: chunks of the stream, a running sum of depthwise convs, the last chunk
    taken as ``[-1]``, a cat, a reshape whose channel count is read from the cat's shape, and a residual branch of
    its own on the cat (so the cat's channels are a group of their own, joined to the stream by its parts)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 48, 1)
        self.convs = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1, groups=16) for _ in range(2))
        self.proj = nn.Linear(48, 48)
        self.head = nn.Conv2d(48, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        spx = x.chunk(3, dim=1)
        out, sp = [], spx[0]
        for i, conv in enumerate(self.convs):
            sp = conv(sp if i == 0 else sp + spx[i])
            out.append(sp)
        y = torch.cat([*out, spx[-1]], 1)
        b, c, h, w = y.shape
        y = y.reshape(b, c, h * w).permute(0, 2, 1)
        y = y + self.proj(F.gelu(y))
        return self.head(y.permute(0, 2, 1).reshape(b, c, h, w))


@pytest.mark.parametrize("cls", [Shuffle, C2f, GLU, Pixel, SplitTranspose])
def test_tricky_structures_are_pruned_exactly(cls):
    torch.manual_seed(0)
    model, x = randomize_bn(cls()).eval(), (torch.randn(2, 3, 6, 6),)
    err, masked, removed = mask_vs_remove(model, x, ratio=0.5)
    assert err <= 1e-5
    assert removed.history[1].stats["channels_removed"] > 0
    assert removed.after.params < removed.before.params


def test_channel_shuffle_removes_equally_per_shuffle_group():
    torch.manual_seed(0)
    result = prune(randomize_bn(Shuffle()).eval(), (torch.randn(2, 3, 6, 6),), ratio=0.5)
    a, b = result.module.get_submodule("a.0"), result.module.get_submodule("b.0")
    assert a.out_channels == 8 and b.out_channels == 8 and b.groups == 4


def test_glu_chunk_removes_the_requested_share():
    torch.manual_seed(0)
    result = prune(GLU().eval(), (torch.randn(2, 3, 6, 6),), ratio=0.5)
    assert result.module.a.out_channels == 32 and result.module.b.in_channels == 16
    assert "split" in result.module.code  # chunk(2) became a split with the new sizes


def test_pixel_shuffle_keeps_blocks():
    torch.manual_seed(0)
    result = prune(randomize_bn(Pixel()).eval(), (torch.randn(2, 3, 6, 6),), ratio=0.5)
    a, b = result.module.get_submodule("a.0"), result.module.b
    assert a.out_channels % 4 == 0 and b.in_channels == a.out_channels // 4


def test_layernorm_group_reported_inexact():
    class LN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.ln, self.b = nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 3)

        def forward(self, x):
            return self.b(self.ln(self.a(x)))

    result = prune(LN().eval(), (torch.randn(4, 6),), ratio=0.5)
    deps, sel = result.history[0], result.history[1]
    assert deps.stats["inexact_groups"] == 1
    assert any("LayerNorm" in n for n in deps.notes) and any("inexact" in n for n in sel.notes)
    assert result.module.ln.normalized_shape == (8,)


class RMSBlock(nn.Module):
    """A Llama-style pre-norm MLP block on a residual stream: nn.RMSNorm and F.rms_norm."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.up, self.down = nn.Linear(6, 16), nn.RMSNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.gain = nn.Parameter(torch.rand(16) + 0.5)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.down(F.silu(self.up(self.norm(h))))
        return self.out(F.rms_norm(h, (16,), self.gain, 1e-6))


def test_rmsnorm_prunes_like_layernorm():
    torch.manual_seed(0)
    model, x = RMSBlock().eval(), (torch.randn(4, 5, 6),)
    cg = groups(model, x)
    stream = cg.group("inp")
    assert stream.n_prunable == 16 and stream.inexact  # RMSNorm normalises over the stream's channels
    err, masked, removed = mask_vs_remove(model, x, ratio=0.5)
    assert removed.module.norm.normalized_shape == (8,) and removed.module.norm.weight.shape == (8,)
    assert removed.module.gain.shape == (8,) and removed.module.up.out_features == 16
    assert any("inexact" in n for n in removed.history[1].notes)
    # the hidden width alone is exact: the norms only see the stream
    err, masked, removed = mask_vs_remove(model, x, ratio=0.5, exclude=["inp"])
    assert err <= 1e-5 and removed.module.up.out_features == 16 and removed.module.norm.normalized_shape == (16,)


def test_resnext_ratio_within_one_group():
    model, x = fxc.golden.load("resnext50")
    cg = groups(model, x)
    grp = cg.group("layer1.0.conv2")
    assert grp.blocks is not None and int(grp.blocks.max()) + 1 == 32
    result = prune(model, x, ratio=0.3, exclude=["fc"])
    conv = result.module.get_submodule("layer1.0.conv2")
    assert conv.groups == 32
    removed = 128 - conv.out_channels
    assert abs(removed - 0.3 * 128) <= 32  # one channel per conv group
    assert conv.out_channels % 32 == 0


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_vit_multihead_attention_equal_head_dims(ratio):
    model, x = fxc.golden.load("vit-tiny-digits")
    result = prune(model, x, ratio=ratio, exclude=["head"])
    mhas = [m for m in result.module.modules() if isinstance(m, PrunedMultiheadAttention)]
    orig = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(mhas) == len(orig) > 0
    for new, old in zip(mhas, orig):
        assert new.num_heads == old.num_heads
        assert new.head_dim == old.head_dim - round(ratio * old.head_dim)
        assert new.scale == pytest.approx(old.head_dim ** -0.5)
    with torch.no_grad():
        assert torch.isfinite(result.module(*x)).all()
    # with the LayerNorm-coupled embedding left alone, removing head dims is exact
    stream = [g.name for g in groups(model, x).groups if g.inexact and g.n_prunable]
    err, _, _ = mask_vs_remove(model, x, ratio=ratio, exclude=["head", *stream])
    assert err <= 1e-5


# ---- the anchor ----------------------------------------------------------------------------------------------

def test_resnet18_half_matches_anchor():
    model, x = fxc.golden.load("resnet18")
    result = prune(model, x, ratio=0.5, criterion="l1", exclude=["fc"])
    assert result.after.params == 3_055_880  # Torch-Pruning 1.6.1: 3.06 M
    assert result.after.macs == pytest.approx(0.487e9, rel=0.01)  # Torch-Pruning: 0.487 GMACs
    assert result.module.fc.in_features == 256


# ---- selection options ---------------------------------------------------------------------------------------

def test_every_criterion_runs_and_honours_the_ratio():
    model, x = build("residual")
    calib = [(torch.randn(2, 3, 16, 16),) for _ in range(3)]
    for criterion in ("l1", "l2", "fpgm", "slim", "taylor", "apoz", "mean_activation", "random"):
        result = fxc.compile(model, x, [{"pass": "prune", "criterion": criterion, "ratio": 0.5}],
                             calibration_data=calib)
        ratios = result.history[1].stats["layer_ratios"]
        assert ratios == {"down.0": 0.5, "stem.0": 0.5, "a.0": 0.5}, criterion


def test_data_criteria_need_calibration_data():
    with pytest.raises(fxc.FxCompressError, match="calibration_data"):
        prune(*build("residual"), criterion="apoz")


def test_opt_slim_removes_the_energy_share():
    model, x = build("residual")
    with torch.no_grad():
        model.a[1].weight.copy_(torch.tensor([0.1, 0.1, 0.1, 0.1, 1.0, 1.0, 1.0, 1.0]))
    result = prune(model, x, criterion="opt_slim", ratio=0.05)
    sel = result.history[1].stats
    assert sel["layer_ratios"]["a.0"] == 0.5  # 4 x 0.01 energy of 4.04 is within 5%; the next one is not
    assert sel["opt_slim_thresholds"]["a.0"] == pytest.approx((0.01 + 1.0) / 2)
    full = prune(model, x, criterion="opt_slim", ratio=0.99).history[1].stats
    assert all(r < 1 for r in full["layer_ratios"].values())


def test_ratio_dict_round_to_min_channels_exclude_global():
    model, x = build("residual")
    sel = prune(model, x, ratio={"a.*": 0.25, "*": 0.5}).history[1].stats
    assert sel["layer_ratios"] == {"down.0": 0.5, "stem.0": 0.5, "a.0": 0.25}
    sel = prune(model, x, ratio=0.3, round_to=4).history[1].stats
    assert sel["layer_ratios"] == {"down.0": 0.25, "stem.0": 0.5, "a.0": 0.5}
    sel = prune(model, x, ratio=0.9, min_channels=3).history[1].stats
    assert sel["layer_ratios"]["stem.0"] == 0.625
    sel = prune(model, x, ratio=0.5, exclude=["stem.0"]).history[1].stats
    assert "stem.0" not in sel["layer_ratios"] and sel["groups_excluded"] == 1
    sel = prune(model, x, ratio=0.5, scope="global").history[1].stats
    assert sel["channels_removed"] == 16


@pytest.mark.parametrize("options, match", [
    ({"criterion": "l3"}, "l1"), ({"ratio": 1.0}, "ratio"), ({"scope": "everywhere"}, "scope"),
    ({"exclude": ["nope"]}, "matches no module"), ({"mode": "zero"}, "mode"), ({"criteria": "l1"}, "no option"),
])
def test_bad_options_are_clear_errors(options, match):
    model, x = build("residual")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxc.FxCompressError, match=match):
        prune(model, x, **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_user_model_untouched_and_report():
    model, x = build("residual")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, x, ratio=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "remove_channels" in result.report()
    assert [h.name for h in result.history] == ["propagate_dependencies", "select_channels", "remove_channels"]


# ---- golden CNNs ---------------------------------------------------------------------------------------------

GOLDEN_FAST = ["resnet18", "resnet20-digits", "mobilenetv2-digits", "vgg-small-digits"]
GOLDEN_SLOW = ["resnet50", "resnext50", "mobilenet_v2", "densenet121", "unet", "vgg11_bn", "resnet20-hard-digits",
               "mobilenetv2-hard-digits", "vgg-small-hard-digits"]


@pytest.mark.parametrize("name", GOLDEN_FAST + [pytest.param(n, marks=pytest.mark.slow) for n in GOLDEN_SLOW])
def test_golden_cnn_mask_equals_remove(name):
    model, x = fxc.golden.load(name)
    randomize_bn(model)
    last = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    err, masked, removed = mask_vs_remove(model, x, ratio=0.5, exclude=[last])
    assert err <= 1e-5, err
    assert removed.after.macs < 0.4 * removed.before.macs


@pytest.mark.parametrize("name, classifier", [("vit-tiny-digits", "head"), ("resnet20-digits", "fc")])
def test_pruned_models_export_and_run_in_ort(name, classifier, tmp_path):
    from fxcompress.export import ort

    model, x = fxc.golden.load(name)
    result = prune(model, x, ratio=0.5, exclude=[classifier])
    path = result.export_onnx(tmp_path / "pruned.onnx")
    batch = torch.randn(3, *x[0].shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scale = result.module(batch).abs().max().item()
    assert ort.max_abs_diff(result.module, path, batch) <= 1e-4 * scale


def test_attention_whole_heads():
    model, x = fxc.golden.load("vit-tiny-digits")
    result = prune(model, x, ratio=0.5, exclude=["head"], attention="heads")
    orig = next(m for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    new = next(m for m in result.module.modules() if isinstance(m, PrunedMultiheadAttention))
    assert new.head_dim == orig.head_dim and new.num_heads == orig.num_heads // 2
    with torch.no_grad():
        assert torch.isfinite(result.module(*x)).all()


def test_channel_graph_is_a_networkx_graph_of_named_spaces():
    import networkx as nx
    from fxcompress.passes.pruning.lib.channel_spaces import Factor, Identity, Offset

    cg = groups(*build("splits_views"))
    g = cg.graph
    assert isinstance(g, nx.Graph)
    assert g.nodes[("conv_0", 1)]["size"] == 12 and ("@conv.0.weight", 0) in g
    maps = {type(d["map"]) for _, _, d in g.edges(data=True)}
    assert maps == {Identity, Offset, Factor}
    assert g.edges[("split.0", 1), ("conv_2", 1)]["map"] == Offset(0, 4)


def test_pruning_twice_prunes_the_pruned_attention_again():
    model, x = fxc.golden.load("vit-tiny-digits")
    step = {"pass": "prune", "ratio": 0.5, "exclude": ["head"]}
    result = fxc.compile(model, x, [step, step])
    orig = next(m for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    new = next(m for m in result.module.modules() if isinstance(m, PrunedMultiheadAttention))
    assert new.head_dim == orig.head_dim // 4
    assert new.scale == pytest.approx(orig.head_dim ** -0.5)
    with torch.no_grad():
        assert torch.isfinite(result.module(*x)).all()


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_stochastic_depth_does_not_stop_the_residual_stream(library):
    """torchvision's stochastic_depth is a call the graph keeps (torch.fx.wrap); timm's DropPath traces to the
    identity in eval.  Either way the residual stream is one prunable group, pruned exactly."""
    lib = pytest.importorskip(library)
    drop = lib.ops.StochasticDepth(0.2, "row") if library == "torchvision" else lib.layers.DropPath(0.2)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.body = nn.Sequential(nn.Conv2d(16, 32, 1), nn.GELU(), nn.Conv2d(32, 16, 1))
            self.drop = drop
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            x = self.stem(x)
            return self.head(x + self.drop(self.body(x)))

    model, x = Block().eval(), (torch.randn(2, 3, 8, 8),)
    err, masked, removed = mask_vs_remove(model, x, ratio=0.5)
    assert err <= 1e-5
    stats = removed.history[0].stats
    assert stats["barrier_ops"] == 0
    assert stats["prunable_channels"] == stats["channels"] - 3 - 4  # all but the input's and the output's
    assert removed.module.stem.out_channels == 8 and removed.module.get_submodule("body.0").out_channels == 16


def test_einsum_prunes_like_the_products_it_spells():
    """Attention and a linear layer written with torch.einsum (MaxViT's, many timm blocks'): every subscript letter
    is one space, contracted letters included, and the MACs count as the matmuls they are."""

    class EinsumBlock(nn.Module):
        def __init__(self, c=32, heads=4):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(c, 3 * c)
            self.proj = nn.Parameter(torch.randn(16, c) / c ** 0.5)
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            attn = torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1)
            y = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, c)
            return self.head(F.gelu(torch.einsum("bnc,oc->bno", y, self.proj)))

    model, x = EinsumBlock().eval(), (torch.randn(2, 6, 32),)
    traced = fxc.compile(model, x, [{"pass": "fold_bn"}])
    assert traced.before.macs == 2 * 6 * (32 * 96 + 2 * 6 * 32 + 32 * 16 + 16 * 5)
    err, masked, removed = mask_vs_remove(model, x, ratio=0.5)
    assert err <= 1e-5 and removed.history[0].stats["barrier_ops"] == 0
    assert removed.after.macs < 0.6 * removed.before.macs


def test_select_maps_the_other_dims_through():
    """``x.select(1, 0)`` (how torch.export records BERT's pooler reading ``hidden[:, 0]``): the hidden width
    before it prunes; a select along the channel dim keeps that dim whole."""

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 32), nn.Linear(32, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = self.b(F.gelu(self.a(x)))
            return self.c(F.gelu(h.select(1, 0))), h.select(2, 5)

    model, x = Pool().eval(), (torch.randn(2, 5, 8),)
    err, _, removed = mask_vs_remove(model, x, ratio=0.5)
    assert err <= 1e-5 and removed.history[0].stats["barrier_ops"] == 0
    assert removed.module.a.out_features == 16 and removed.module.b.out_features == 16  # b's outputs: selected


def test_functional_group_norm_view_as_and_weight_standardisation_are_no_barriers():
    """F.group_norm (timm's GroupNorm1) prunes equally in each of its groups and, normalising over groups of
    channels, is reported inexact like nn.GroupNorm; view_as / reshape_as map dims like reshape; a weight
    standardised with batch statistics (NF-Nets' ScaledStdConv2d: F.batch_norm over the fan-in, then reshape_as the
    weight) changes when its input channels go, so that group is reported inexact instead of pruned as if exact."""

    class Block(nn.Module):
        def __init__(self, standardise: bool):
            super().__init__()
            self.standardise = standardise
            self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
            self.norm = nn.Parameter(torch.rand(16) + 0.5)
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            y = F.group_norm(F.relu(self.a(x)), 4, self.norm)
            w = self.b.weight
            if self.standardise:
                w = F.batch_norm(w.reshape(1, 16, -1), None, None, training=True, eps=1e-5).reshape_as(w)
            y = F.conv2d(y, w, self.b.bias, padding=1)
            return self.head(F.relu(y).view_as(y))

    x = (torch.randn(2, 3, 8, 8),)
    for standardise, reason in ((False, "group_norm normalises over groups"),
                                (True, "batch statistics normalise over this dim")):
        removed = prune(Block(standardise).eval(), x, ratio=0.5)
        deps = removed.history[0]
        assert deps.stats["barrier_ops"] == 0 and any(reason in n for n in deps.notes), deps.notes
        assert removed.module.a.out_channels == 8 and removed.module.norm.shape == (8,)  # 2 of 4 per group
        assert removed.module.head.in_channels == 8
