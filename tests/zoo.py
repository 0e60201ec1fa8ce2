"""Small architectures covering what the passes must handle, each with a seeded example input.

``ZOO`` maps a name to a factory returning ``(model, example_inputs)`` in eval mode with randomised BatchNorm
statistics and affine parameters (defaults would make folding tests vacuous).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress.bench import zoo as bench_zoo


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    return bench_zoo.randomize_bn(model, seed, mean=0.5, var=(0.25, 2.25), weight=(0.5, 1.5), bias=0.2)


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, dims: int = 2) -> nn.Sequential:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    return nn.Sequential(conv(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.a = cbr(8, 8)
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.c = cbr(8, 16, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b(self.a(x)))
        x = self.down(x) + self.c(x)
        return self.fc(x.mean((2, 3)))


class Concat(nn.Module):
    """DenseNet-style: every layer sees the concat of all earlier outputs; then a transition conv."""

    def __init__(self, growth: int = 4, layers: int = 3):
        super().__init__()
        self.stem = cbr(3, 8)
        self.layers = nn.ModuleList(cbr(8 + i * growth, growth) for i in range(layers))
        self.transition = cbr(8 + layers * growth, 8, 1)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return self.transition(torch.cat(feats, 1)).flatten(1)


class GroupedDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.grouped = cbr(16, 32, groups=4)
        self.depthwise = cbr(32, 32, groups=32)
        self.pointwise = nn.Sequential(nn.Conv2d(32, 24, 1), nn.BatchNorm2d(24))

    def forward(self, x):
        return self.pointwise(self.depthwise(self.grouped(self.stem(x))))


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = cbr(3, 8, stride=2)
        self.up = nn.ConvTranspose2d(8, 6, 4, 2, 1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.up1d = nn.ConvTranspose1d(6, 4, 3, 2, 1, output_padding=1)
        self.bn1d = nn.BatchNorm1d(4)

    def forward(self, x):
        y = F.relu(self.bn(self.up(self.enc(x))))
        y = y.flatten(2)  # (N, 6, H*W)
        return self.bn1d(self.up1d(y))


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1, self.e2 = cbr(3, 8), cbr(8, 16, stride=2)
        self.mid = cbr(16, 16)
        self.up = nn.ConvTranspose2d(16, 8, 2, 2)
        self.up_bn = nn.BatchNorm2d(8)
        self.d1 = cbr(16, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        s1 = self.e1(x)
        y = self.mid(self.e2(s1))
        y = F.relu(self.up_bn(self.up(y)))
        return self.head(self.d1(torch.cat([y, s1], dim=1)))


class Dims1d3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = cbr(3, 6, dims=1)
        self.c3 = cbr(2, 4, dims=3)

    def forward(self, x):
        a = self.c1(x.flatten(2))  # (N, 3, H*W)
        b = self.c3(x[:, :2].unsqueeze(2).repeat(1, 1, 2, 1, 1))  # (N, 2, 2, H, W)
        return a.sum(-1), b.mean((2, 3, 4))


class SharedAndMultiUser(nn.Module):
    """A conv called twice (with a different BN each time) and a conv whose output feeds BN and an add."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.stem(x)
        x = self.bn_b(self.shared(F.relu(self.bn_a(self.shared(x)))))
        y = self.conv(x)
        return self.bn(y) + y


class Functional(nn.Module):
    """Bare Parameters used through F.conv2d / F.batch_norm / F.linear, and matmul with a Parameter."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3, generator=g) * 0.3)
        self.register_buffer("mean", torch.randn(8, generator=g))
        self.register_buffer("var", torch.rand(8, generator=g) + 0.5)
        self.gamma = nn.Parameter(torch.rand(8, generator=g) + 0.5)
        self.beta = nn.Parameter(torch.randn(8, generator=g))
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.proj = nn.Parameter(torch.randn(8, 5, generator=g))
        self.lin = nn.Parameter(torch.randn(4, 5, generator=g))

    def forward(self, x):
        x = F.relu(F.batch_norm(F.conv2d(x, self.w, padding=1), self.mean, self.var, self.gamma, self.beta))
        x = F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, eps=1e-3)
        x = x.mean((2, 3)) @ self.proj
        return F.linear(x, self.lin)


class LinearBN(nn.Module):
    """Linear + BatchNorm1d on a 2-D output (foldable) and on a 3-D output (BN over the wrong axis)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(12, 16), nn.BatchNorm1d(16)
        self.fc2, self.bn2 = nn.Linear(16, 6), nn.BatchNorm1d(4)

    def forward(self, x):
        y = F.relu(self.bn1(self.fc1(x.flatten(1))))
        return self.bn2(self.fc2(y.view(y.size(0), 4, 4).repeat(1, 1, 4)))


class Attention(nn.Module):
    """A ViT-style block: nn.MultiheadAttention, LayerNorm, GroupNorm, hand-written attention, cls token."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.gn = nn.GroupNorm(4, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.ln1 = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads = heads
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.gn(self.patch(x)).flatten(2).transpose(1, 2)  # (N, 16, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        h = self.ln1(x)
        x = x + self.mha(h, h, h, need_weights=False)[0]
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln2(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
        x = x + self.out((attn @ v).transpose(1, 2).reshape(n, t, d))
        return self.head(x[:, 0])


class SplitsAndViews(nn.Module):
    """split/chunk/permute/view/flatten, and a dict output."""

    def __init__(self):
        super().__init__()
        self.conv = cbr(3, 12)
        self.fc = nn.Linear(6 * 8 * 8, 5)

    def forward(self, x):
        a, b = torch.split(self.conv(x), [4, 8], dim=1)
        c, d = b.chunk(2, dim=1)
        y = torch.cat([a.permute(0, 2, 3, 1), c.permute(0, 2, 3, 1)], -1).permute(0, 3, 1, 2)
        y = y.reshape(y.shape[0], 8, -1)[:, :6]
        return {"logits": self.fc(y.flatten(1)), "aux": d.sum((2, 3))}


class Recurrent(nn.Module):
    """Integer token inputs, Embedding, an LSTM with nested tuple outputs, BatchNorm after a non-producer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.bn = nn.BatchNorm1d(12)
        self.fc = nn.Linear(12, 3)

    def forward(self, tokens):
        out, (h, c) = self.lstm(self.emb(tokens))
        return self.fc(self.bn(h[-1])), out


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNet V2 channel shuffle: sizes read from x.size(), view / transpose / contiguous / view."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, channels, height, width)


class ShuffleBlock(nn.Module):
    """ShuffleNet V2's unit as torchvision builds it: stride 2 runs two branches on the input, stride 1 chunks it in
    two and runs a branch on the second half; both concatenate and shuffle."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, half = stride, cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                         nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    """A small ShuffleNet V2: stem, a stride-2 unit and two stride-1 units, a 1x1 conv, global pooling, classifier."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, stride=2)
        self.stage = nn.Sequential(ShuffleBlock(8, 16, 2), ShuffleBlock(16, 16, 1), ShuffleBlock(16, 16, 1))
        self.head = cbr(16, 24, k=1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(self.head(self.stage(self.stem(x))).mean([2, 3]))


class TiedEmbedding(nn.Module):
    """A language-model head: the output Linear shares the Embedding's weight; a non-persistent buffer."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(20, width)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, 20, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("offset", torch.linspace(0, 1, width), persistent=False)

    def forward(self, tokens):
        return self.head(torch.relu(self.proj(self.embed(tokens)) + self.offset))


ZOO = {
    "residual": lambda: (Residual(), (_x(2, 3, 16, 16),)),
    "concat": lambda: (Concat(), (_x(2, 3, 8, 8),)),
    "grouped_depthwise": lambda: (GroupedDepthwise(), (_x(2, 3, 8, 8),)),
    "transposed": lambda: (Transposed(), (_x(2, 3, 8, 8),)),
    "unet": lambda: (UNet(), (_x(2, 3, 16, 16),)),
    "dims_1d_3d": lambda: (Dims1d3d(), (_x(2, 3, 6, 6),)),
    "shared_multi_user": lambda: (SharedAndMultiUser(), (_x(2, 3, 8, 8),)),
    "functional": lambda: (Functional(), (_x(2, 3, 8, 8),)),
    "linear_bn": lambda: (LinearBN(), (_x(2, 3, 2, 2),)),
    "attention": lambda: (Attention(), (_x(2, 3, 16, 16),)),
    "splits_views": lambda: (SplitsAndViews(), (_x(2, 3, 8, 8),)),
    "shufflenet": lambda: (ShuffleNet(), (_x(2, 3, 16, 16),)),
    "recurrent": lambda: (Recurrent(), (torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1)),)),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, inputs = ZOO[name]()
    return randomize_bn(model, seed).eval(), inputs


def small_resnet():
    """A CLI factory: (model, example_inputs)."""
    return build("residual")
