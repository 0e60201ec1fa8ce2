"""The elastic supernet: width masks and depth gates switch subnets without copying weights, and every subnet
extracts to a real smaller model with the supernet's outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from fxcompress.passes.nas.lib.elastic import ElasticSpace, Subnet, Supernet, extract, skippable_blocks
from fxcompress.passes.pruning.lib import latency
from fxcompress.passes.pruning.lib.channel_deps import ChannelGraph
from fxcompress.passes.pruning.lib.width_space import WidthSpace, candidate_groups
from fxcompress.passes.pruning.select_channels import SCORERS
from torch.utils import _pytree as pytree
from zoo import build, randomize_bn

import fxcompress as fxc
from fxcompress.errors import RecipeError
from fxcompress.fxutil import lookup

ARCHS = ["residual", "concat", "grouped_depthwise", "functional", "linear_bn", "attention", "shufflenet",
         "splits_views"]


class Chain(nn.Module):
    """A stem, four identity-shortcut residual blocks (one nested in another's branch), a head."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                          nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width)) for _ in range(4))
        self.inner = nn.Conv2d(width, width, 1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.blocks[0](x)
        x = self.act(x + self.blocks[1](x))  # in place on the sum
        y = x + self.inner(x)  # nested: the next block's branch holds this residual
        x = x + self.blocks[2](y)
        x = x + self.blocks[3](x)
        return self.head(x.mean((2, 3)))


def elastic(gm, widths=(0.25, 0.5, 0.75, 1.0), depth=True, align=1):
    cg = ChannelGraph(gm)
    space = WidthSpace(cg, SCORERS["l1"](cg, None, {}), latency.layer_shapes(gm), candidate_groups(cg))
    return ElasticSpace(space, widths, align, depth)


def chain():
    torch.manual_seed(0)
    model = randomize_bn(Chain()).eval()
    x = torch.randn(4, 3, 8, 8)
    return model, (x,), fxc.trace(model, (x,))


def test_skippable_blocks_are_identity_shortcut_residuals_nested_ones_included():
    _, _, gm = chain()
    blocks = skippable_blocks(gm)
    assert [b.modules[:1] for b in blocks] == [("blocks.0.0",), ("blocks.1.0",), ("inner",), ("inner",),
                                               ("blocks.3.0",)]
    outer = blocks[3]  # x + blocks[2](x + inner(x)): its branch holds the inner residual and its add
    assert blocks[2].add in outer.branch and "blocks.2.4" in outer.modules


def test_skippable_blocks_refuse_projection_shortcuts_and_shared_branches():
    class Projection(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.proj = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            shared = self.a(x)
            y = self.proj(x) + self.b(x)  # the branch reads x, the other operand is proj(x): no identity shortcut
            return y + shared + shared.relu()  # shared has a user outside any branch over y

    gm = fxc.trace(Projection(), (torch.randn(1, 4, 4, 4),))
    assert skippable_blocks(gm) == []


def test_choices_are_aligned_nested_and_include_the_full_width():
    _, _, gm = chain()
    space = elastic(gm, align=4)
    for grp, choice in zip(space.groups, space.choices):
        assert choice[0] == 0 and choice == sorted(set(choice))
        assert all((grp.size - k) % 4 == 0 for k in choice)
    wide, narrow = space.masks(Subnet(tuple(c[1] for c in space.choices))), space.masks(space.smallest())
    for target, mask in wide.items():  # a narrower subnet's channels are a subset of a wider one's
        assert bool((narrow[target] <= mask).all())


def _check_subnets(model, inputs, gm, space, subnets):
    net = Supernet(gm, space).eval()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with torch.no_grad():
        want = model(*inputs)
        net.activate(space.largest())
        torch.testing.assert_close(net(*inputs), want, rtol=0, atol=0)
        for subnet in subnets:
            net.activate(subnet)
            got = net(*inputs)
            small = extract(gm, space, subnet, inputs)
            assert sum(p.numel() for p in small.parameters()) <= sum(p.numel() for p in gm.parameters())
            out = small(*inputs)
            scale = max(float(t.abs().max()) for t in pytree.tree_leaves(want))
            torch.testing.assert_close(out, got, rtol=0, atol=1e-5 * max(scale, 1.0))
    for k, v in gm.state_dict().items():  # nothing was written: masks are computed, never applied in place
        assert torch.equal(v, before[k]), k


def test_every_subnet_extracts_to_the_supernet_slice_widths_and_depths():
    model, inputs, gm = chain()
    space = elastic(gm)
    rng = np.random.default_rng(0)
    subnets = [space.smallest(), *(space.sample(rng) for _ in range(6))]
    assert any(s.skipped for s in subnets) and any(any(s.removed) for s in subnets)
    _check_subnets(model, inputs, gm, space, subnets)
    small = extract(gm, space, space.smallest(), inputs)
    assert not any(n.name in space.smallest().skipped for n in small.graph.nodes)
    small.train()(*inputs).sum().backward()  # the in-place ReLU on a dropped block's sum writes a copy of x
    assert space.macs(space.smallest()) < 0.25 * space.macs(Subnet(space.smallest().removed))


@pytest.mark.parametrize("arch", ARCHS)
def test_width_subnets_extract_exactly_on_many_architectures(arch):
    model, inputs = build(arch)
    gm = fxc.trace(model, inputs)
    space = elastic(gm, depth=False)
    inexact = {g.name for g in space.groups if g.inexact}
    rng = np.random.default_rng(1)
    subnets = []
    for _ in range(4):
        s = space.sample(rng)
        subnets.append(Subnet(space.valid([0 if g.name in inexact else k for g, k in zip(space.groups, s.removed)])))
    _check_subnets(model, inputs, gm, space, subnets)


def test_a_subnet_outside_the_space_is_refused():
    _, _, gm = chain()
    space = elastic(gm)
    with pytest.raises(RecipeError, match="one width per elastic group"):
        space.check(Subnet((0,)))
    with pytest.raises(RecipeError, match="not one of its widths"):
        space.check(Subnet(tuple(1 for _ in space.groups)))
    with pytest.raises(RecipeError, match="no skippable block"):
        space.check(Subnet(space.largest().removed, ("stem_0",)))


def _blobs(n=384, classes=4):
    """(train, held-out) batches of images whose class sets each channel's mean: separable after global pooling,
    by any width."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, 3, 1, 1, generator=g) * 1.5
    y = torch.randint(0, classes, (2 * n,), generator=g)
    x = centres[y] + torch.randn(2 * n, 3, 8, 8, generator=g)
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 2 * n, 32)]
    return batches[:len(batches) // 2], batches[len(batches) // 2:]


def _accuracy(module, batches):
    with torch.no_grad():
        return float(sum((module(x).argmax(1) == y).sum() for x, y in batches) / sum(len(y) for _, y in batches))


def test_sandwich_training_trains_the_largest_and_smallest_subnets_and_never_writes_masks():
    from fxcompress.passes.nas.lib import sandwich
    from fxcompress.passes.train.lib import bn_stats, training

    from fxcompress.context import CompileContext

    _, inputs, gm = chain()
    train, held = _blobs()
    space = elastic(gm)
    net = Supernet(gm, space)
    ctx = CompileContext(gm=gm, example_inputs=inputs, train_data=train)
    stats = sandwich.train(ctx, net, training.Loop(epochs=4, lr=0.05, seed=0), random_subnets=2)
    assert stats["steps"] == 4 * len(train) and stats["subnets_per_step"] == 4
    assert stats["epoch_loss"][-1] < 0.5 * stats["epoch_loss"][0]
    norms = bn_stats.tracked_norms(net)
    for subnet in (space.largest(), space.smallest()):
        net.activate(subnet)
        bn_stats.reestimate(net, norms, [(x,) for x, _ in train])
        assert _accuracy(net.eval(), held) >= 0.85, subnet
    masked = space.masks(space.smallest())
    assert all(bool(lookup(gm, t)[m.expand_as(lookup(gm, t)) == 0].abs().sum() > 0) for t, m in masked.items()
               if t in dict(gm.named_parameters()))
