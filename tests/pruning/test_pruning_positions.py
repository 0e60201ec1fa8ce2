"""Pruning beside dims that are not channels: positions picked from bias tables, counts of conv groups, token
subsampling, the tokens an attention attends over."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from test_pruning import mask_vs_remove

import fxcompress as fxc


class TableBias(nn.Module):
    """MaxViT's attention: a relative position bias gathered from a table by an index buffer, added per head."""

    def __init__(self, dim=32, heads=4, side=3):
        super().__init__()
        self.heads, self.n = heads, side * side
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * side - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + side - 1
        self.register_buffer("index", rel[..., 0] * (2 * side - 1) + rel[..., 1])

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index.view(-1)].view(self.n, self.n, -1).permute(2, 0, 1)
        attn = torch.softmax(q @ k.transpose(-2, -1) * 0.25 + bias.unsqueeze(0), dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, c))


def test_a_table_gathered_by_an_index_tensor_is_positions_not_channels():
    torch.manual_seed(0)
    model, x = TableBias().eval(), (torch.randn(2, 9, 32),)
    err, masked, removed = mask_vs_remove(model, x, ratio=0.5)
    deps = removed.history[0].stats
    assert deps["barrier_ops"] == 0 and deps["positional_groups"] >= 1
    assert deps["prunable_channels"] == 8  # the head dim (attention="dims"); the stream is the model's input
    assert err <= 1e-5 and removed.module.qkv.out_features == 48
    assert any("entries picked by an index tensor" in n for n in removed.history[0].notes)


class FunctionalGroups(nn.Module):
    """Grouped and depthwise convs called as functions on computed weights (timm's weight-standardised convs)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.grouped = nn.Parameter(torch.randn(24, 4, 3, 3) * 0.2)  # 16 -> 24 channels in 4 groups
        self.gain = nn.Parameter(torch.rand(24, 1, 1, 1) + 0.5)
        self.depthwise = nn.Parameter(torch.randn(48, 1, 3, 3) * 0.2)  # 24 -> 48: multiplier 2
        self.head = nn.Conv2d(48, 5, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(F.conv2d(x, self.grouped * self.gain, padding=1, groups=4))
        return self.head(F.relu(F.conv2d(x, self.depthwise, padding=1, groups=24)))


def pruned_exactly_without_barriers(model: nn.Module, *shape: int):
    """The model pruned at ratio 0.5 in remove mode (equal to mask mode, no barrier op) and its dependency stats."""
    torch.manual_seed(0)
    err, masked, removed = mask_vs_remove(model.eval(), (torch.randn(*shape),), ratio=0.5)
    deps = removed.history[0].stats
    assert err <= 1e-5 and deps["barrier_ops"] == 0
    return removed, deps


def test_functional_grouped_and_depthwise_convs_prune_exactly():
    removed, deps = pruned_exactly_without_barriers(FunctionalGroups(), 2, 3, 8, 8)
    assert removed.module.grouped.shape == (12, 2, 3, 3)  # every group keeps the same offsets: 4 x 3 out, 2 in
    assert removed.module.stem.out_channels == 8 and removed.module.depthwise.shape[0] == 24


class SubsampleBias(nn.Module):
    """LeViT's attention downsampling: tokens subsampled by a strided slice, a bias table indexed as [:, idxs]."""

    def __init__(self, dim=16, heads=2, side=4):
        super().__init__()
        self.heads, self.side = heads, side
        self.q, self.kv, self.proj = nn.Linear(dim, 8 * heads), nn.Linear(dim, 16 * heads), nn.Linear(8 * heads, dim)
        self.biases = nn.Parameter(torch.randn(heads, side * side))
        self.register_buffer("idxs", torch.randint(0, side * side, ((side // 2) ** 2, side * side)))

    def forward(self, x):
        b, n, c = x.shape
        k, v = self.kv(x).view(b, n, self.heads, -1).permute(0, 2, 1, 3).split([8, 8], dim=3)
        sub = x.view(b, self.side, self.side, c)[:, ::2, ::2].reshape(b, -1, c)
        q = self.q(sub).view(b, -1, self.heads, 8).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1) * 0.3 + self.biases[:, self.idxs]).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, -1, 8 * self.heads))


def test_strided_token_slices_and_bias_tables_indexed_by_tensors_prune_exactly():
    torch.manual_seed(0)
    model, x = SubsampleBias().eval(), (torch.randn(2, 16, 16),)
    err, masked, removed = mask_vs_remove(model, x, ratio=0.5)
    deps = removed.history[0]
    assert err <= 1e-5 and deps.stats["barrier_ops"] == 0 and removed.module.q.out_features < 16
    assert deps.stats["positional_groups"] >= 1  # the table's positions


class RegisterTokens(nn.Module):
    """Register tokens (a parameter concatenated along the tokens) attended to by scaled_dot_product_attention;
    the other tokens are pooled to a fixed grid, so no input dim holds the token count."""

    def __init__(self, dim=16, registers=4):
        super().__init__()
        self.reg = nn.Parameter(torch.randn(1, registers, dim))
        self.embed, self.pool = nn.Conv2d(3, dim, 1), nn.AdaptiveAvgPool2d(3)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        x = self.pool(self.embed(x)).flatten(2).transpose(1, 2)
        x = torch.cat([self.reg.expand(x.shape[0], -1, -1), x], dim=1)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(y).mean(1)  # pooled over the tokens (timm's global average pooling)


def test_tokens_an_attention_attends_over_are_not_pruned():
    torch.manual_seed(0)
    model, x = RegisterTokens().eval(), (torch.randn(2, 3, 7, 7),)
    err, masked, removed = mask_vs_remove(model, x, ratio=0.5)
    assert err <= 1e-5 and removed.module.reg.shape[1] == 4 and removed.module.qkv.out_features < 48


class SplitAttention(nn.Module):
    """ResNeSt's split attention: features of ``radix`` splits weighted by a softmax over the splits, computed from
    a vector that is reshaped to (radix, C) like the features it multiplies."""

    def __init__(self, c=16, radix=2):
        super().__init__()
        self.radix = radix
        self.stem = nn.Conv2d(3, c, 1)
        self.conv = nn.Conv2d(c, c * radix, 3, padding=1, groups=radix)
        self.fc1, self.fc2 = nn.Conv2d(c, 8, 1), nn.Conv2d(8, c * radix, 1)
        self.head = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        x = F.relu(self.conv(F.relu(self.stem(x))))
        b, rc, h, w = x.shape
        x = x.reshape(b, self.radix, rc // self.radix, h, w)
        gap = self.fc1(x.sum(dim=1).mean((2, 3), keepdim=True))
        attn = self.fc2(F.relu(gap)).view(b, 1, self.radix, -1).transpose(1, 2)
        attn = torch.softmax(attn, dim=1).reshape(b, -1).view(b, -1, 1, 1)
        return self.head((x * attn.reshape(b, self.radix, rc // self.radix, 1, 1)).sum(dim=1))


def test_two_views_that_split_the_same_channels_alike_lose_the_same_channels():
    torch.manual_seed(0)
    model, x = SplitAttention().eval(), (torch.randn(2, 3, 8, 8),)
    err, masked, removed = mask_vs_remove(model, x, ratio=0.5)
    assert err <= 1e-5
    m = removed.module
    assert m.conv.out_channels == m.fc2.out_channels < 32  # one plan for the features and their attention
    assert m.conv.out_channels == 2 * m.head.in_channels


class TracedRepeat(nn.Module):
    """Tiles whose counts are traced values (XCiT repeats by a count read from a shape)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 16, 1), nn.Conv2d(32, 5, 1)

    def forward(self, x):
        h = F.relu(self.conv(x))
        return self.head(h.repeat(1, x.shape[0], 1, 1))  # channels tiled batch-many times (2 here)


def test_a_tile_counted_by_a_traced_value_prunes_both_copies_alike():
    torch.manual_seed(0)
    model, x = TracedRepeat().eval(), (torch.randn(2, 3, 8, 8),)
    err, masked, removed = mask_vs_remove(model, x, ratio=0.5)
    assert err <= 1e-5
    assert removed.module.conv.out_channels < 16
    assert removed.module.head.in_channels == 2 * removed.module.conv.out_channels


class ShiftedWindows(nn.Module):
    """Swin's padding to whole windows by traced amounts, cyclic shift and crop back at traced bounds."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):  # (B, H, W, C)
        _, h, w, _ = x.shape
        y = F.gelu(self.fc1(x))
        y = F.pad(y, (0, 0, 0, (4 - w % 4) % 4, 0, (4 - h % 4) % 4))
        y = torch.roll(y, shifts=(-2, -2), dims=(1, 2))
        y = F.gelu(self.fc2(y[:, :h, :w, :]))
        return self.head(y)


def test_shifted_windows_padded_and_cropped_at_traced_bounds_prune_exactly():
    removed, deps = pruned_exactly_without_barriers(ShiftedWindows(), 2, 6, 7, 8)
    assert deps["prunable_channels"] == 32  # fc1's and fc2's outputs; H and W are positions
    assert removed.module.fc1.out_features == removed.module.fc2.in_features < 16


def test_a_roll_along_the_channels_leaves_them_whole_with_the_reason():
    class Rolled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c(torch.roll(self.b(F.relu(self.a(x))), 1, dims=1))

    model, x = Rolled().eval(), (torch.randn(2, 3, 6, 6),)
    err, masked, removed = mask_vs_remove(model, x, ratio=0.5)
    assert err <= 1e-5 and removed.module.b.out_channels == 8 and removed.module.a.out_channels == 4
    assert any("torch.roll uses dim 1" in n for n in removed.history[0].notes)


class PatchUnfold(nn.Module):
    """MobileViT's unfolding into patches and folding back: the channels are merged with the patch rows
    ((B, C, H, W) -> (B * C * H / p, p, W / p, p)) and split out again."""

    def __init__(self, p=2):
        super().__init__()
        self.p = p
        self.conv, self.mix, self.head = nn.Conv2d(3, 16, 1), nn.Linear(16, 16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        b, c, h, w = y.shape
        p, nh, nw = self.p, h // self.p, w // self.p
        t = y.reshape(b * c * nh, p, nw, p).transpose(1, 2)  # (B C nh, nw, p, p)
        t = t.reshape(b, c, nh * nw, p * p).transpose(1, 3)  # (B, p p, N, C)
        t = F.relu(self.mix(t)).transpose(1, 3)  # (B, C, N, p p)
        y = t.reshape(b * c * nh, nw, p, p).transpose(1, 2).reshape(b, c, h, w)
        return self.head(y)


def test_patches_unfolded_with_the_channels_prune_exactly_at_any_batch_size():
    torch.manual_seed(0)
    model = PatchUnfold().eval()
    removed, deps = pruned_exactly_without_barriers(model, 2, 3, 8, 8)
    assert deps["prunable_channels"] == 32  # conv's and mix's outputs
    assert removed.module.conv.out_channels < 16 and removed.module.mix.out_features < 16
    masked = fxc.compile(model, (torch.randn(2, 3, 8, 8),), [{"pass": "prune", "ratio": 0.5, "mode": "mask"}])
    x = torch.randn(3, 3, 8, 8)  # the merged dim B * C * H / p holds another batch size
    with torch.no_grad():
        assert torch.allclose(removed.module(x), masked.module(x), atol=1e-6)


class RmsNormed(nn.Module):
    """timm's functional RMS norm over channels (ConvNeXt-RMS): torch.var and torch.rsqrt."""

    def __init__(self):
        super().__init__()
        self.stem, self.pw, self.head = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 24, 1), nn.Conv2d(24, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        y = y * torch.rsqrt(torch.var(y, dim=1, keepdim=True) + 1e-5)
        return self.head(F.gelu(self.pw(y)))


def test_a_functional_norm_over_the_channels_is_inexact_not_a_barrier():
    torch.manual_seed(0)
    err, masked, removed = mask_vs_remove(RmsNormed().eval(), (torch.randn(2, 3, 6, 6),), ratio=0.5)
    deps = removed.history[0]
    assert deps.stats["barrier_ops"] == 0 and deps.stats["inexact_groups"] == 1
    assert deps.stats["prunable_channels"] == 40  # stem's (normalised over: inexact, reported) and pw's
    assert any("torch.var" in n and "reduces over this dim" in n for n in deps.notes)
    assert removed.module.pw.out_channels < 24 and removed.module.stem.out_channels < 16


class AdditiveAttention(nn.Module):
    """SwiftFormer's efficient additive attention: queries and keys L2-normalised over their channels."""

    def __init__(self, dim=16):
        super().__init__()
        self.stem, self.q, self.k = nn.Linear(8, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.w_g = nn.Parameter(torch.randn(dim, 1))
        self.proj, self.head = nn.Linear(dim, dim), nn.Linear(dim, 4)

    def forward(self, x):
        x = F.gelu(self.stem(x))
        q, k = F.normalize(self.q(x), dim=-1), F.normalize(self.k(x), dim=-1)
        g = F.normalize((q @ self.w_g).softmax(dim=1), dim=1)  # over the tokens: positions, not channels
        return self.head(F.gelu(self.proj((g * q).sum(dim=1, keepdim=True) * k)) + x)


def test_an_l2_normalisation_over_the_channels_prunes_exactly():
    removed, deps = pruned_exactly_without_barriers(AdditiveAttention(), 2, 5, 8)
    assert deps["inexact_groups"] == 0 and deps["prunable_channels"] == 33  # stream; q, k, w_g, proj in; w_g out
    assert removed.module.q.out_features == removed.module.k.out_features < 16 and removed.module.w_g.shape[0] < 16


class DecomposedBias(nn.Module):
    """SAM's attention: heads merged into the batch, a relative position bias computed from the queries passed to
    scaled_dot_product_attention as its mask."""

    def __init__(self, dim=16, heads=2, side=3):
        super().__init__()
        self.heads, self.side = heads, side
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel = nn.Parameter(torch.randn(side, side, dim // heads))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).reshape(3, b * self.heads, n, -1)\
            .unbind(0)
        rel = torch.einsum("bhwc,hkc->bhwk", q.reshape(-1, self.side, self.side, q.shape[-1]), self.rel)
        bias = (rel[:, :, :, :, None] + rel[:, :, :, None, :]).reshape(-1, n, n)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(y.view(b, self.heads, n, -1).transpose(1, 2).reshape(b, n, -1))


def test_an_attention_mask_computed_per_head_relates_to_the_heads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), DecomposedBias(), nn.GELU(), nn.Linear(16, 4)).eval()
    removed, deps = pruned_exactly_without_barriers(model, 2, 9, 8)
    qkv, rel = removed.module.get_submodule("1.qkv"), removed.module.get_parameter("1.rel")
    assert qkv.out_features < 48 and rel.shape[-1] < 8
    x = (torch.randn(2, 9, 8),)
    err, masked, heads = mask_vs_remove(model, x, ratio=0.5, attention="heads")
    assert err <= 1e-5 and heads.module.get_submodule("1.qkv").out_features == 24  # one of the two heads
    assert not any("without relating it" in n for n in heads.history[0].notes)


class ResponseNorm(nn.Module):
    """ConvNeXt-V2's global response normalisation: a p-norm over the positions, divided by its mean over the
    channels."""

    def __init__(self):
        super().__init__()
        self.stem, self.pw1, self.pw2 = nn.Conv2d(3, 8, 1), nn.Linear(8, 32), nn.Linear(32, 8)
        self.gamma, self.beta = nn.Parameter(torch.rand(32)), nn.Parameter(torch.rand(32))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.stem(x).permute(0, 2, 3, 1)
        h = F.gelu(self.pw1(y))
        g = h.norm(p=2, dim=(1, 2), keepdim=True)
        h = self.gamma * (h * (g / (g.mean(dim=-1, keepdim=True) + 1e-6))) + self.beta + h
        return self.head((y + self.pw2(h)).permute(0, 3, 1, 2))


def test_a_norm_over_the_positions_maps_the_channels_through():
    err, masked, removed = mask_vs_remove(ResponseNorm().eval(), (torch.randn(2, 3, 5, 5),), ratio=0.5)
    deps = removed.history[0]
    assert deps.stats["barrier_ops"] == 0 and removed.module.pw1.out_features < 32
    assert any("mean" in n and "reduces over this dim" in n for n in deps.notes)  # the mean over channels: inexact
