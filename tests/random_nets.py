"""Random architectures for property tests of channel pruning (hypothesis strategies).

A net is a stem conv, a sequence of blocks acting on an (N, C, H, W) stream, and a head (global pooling or a
flatten into Linear).  Blocks mix residual adds, concats, split/chunk, grouped and depthwise convs, channel
shuffle, squeeze-excitation multiplies, GLU chunks and PixelShuffle round trips.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st
from zoo import randomize_bn

BLOCKS = ("cbr", "residual", "concat", "split", "chunk", "grouped", "depthwise", "shuffle", "se", "glu", "pixel")


def _cbr(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class Block(nn.Module):
    def __init__(self, kind: str, c: int, width: int):
        super().__init__()
        self.kind = kind
        if kind == "cbr":
            self.f, self.out = _cbr(c, width), width
        elif kind == "residual":
            self.f = nn.Sequential(_cbr(c, width), nn.Conv2d(width, c, 3, padding=1), nn.BatchNorm2d(c))
            self.out = c
        elif kind == "concat":
            self.f, self.out = _cbr(c, width, 1), c + width
        elif kind in ("split", "chunk"):
            self.a = c // 2
            self.f = _cbr(c - self.a, width)
            self.out = self.a + width
        elif kind == "grouped":
            g = 2 if c % 2 == 0 and width % 2 == 0 else 1
            self.f, self.out = _cbr(c, width, 3, g), width
        elif kind == "depthwise":
            self.f = nn.Sequential(_cbr(c, c, 3, c), _cbr(c, width, 1))
            self.out = width
        elif kind == "shuffle":
            self.g = 2 if width % 2 == 0 else 1
            self.f, self.out = _cbr(c, width, 1, 1), width
        elif kind == "se":
            self.f = nn.Sequential(nn.Conv2d(c, max(2, c // 2), 1), nn.ReLU(), nn.Conv2d(max(2, c // 2), c, 1))
            self.out = c
        elif kind == "glu":
            self.f, self.out = nn.Conv2d(c, 2 * width, 1), width
        elif kind == "pixel":
            self.f = nn.Sequential(nn.Conv2d(c, width * 4, 1), nn.PixelShuffle(2), nn.Conv2d(width, width, 3, 2, 1))
            self.out = width

    def forward(self, x):
        k = self.kind
        if k == "residual":
            return F.relu(x + self.f(x))
        if k == "concat":
            return torch.cat([x, self.f(x)], 1)
        if k == "split":
            a, b = torch.split(x, [self.a, x.shape[1] - self.a], dim=1)
            return torch.cat([a, self.f(b)], 1)
        if k == "chunk":
            a, b = x[:, :self.a], x[:, self.a:]
            return torch.cat([self.f(b), a], 1)
        if k == "shuffle":
            y = self.f(x)
            n, c, h, w = y.shape
            return y.view(n, self.g, c // self.g, h, w).transpose(1, 2).reshape(n, c, h, w)
        if k == "se":
            return x * torch.sigmoid(self.f(x.mean((2, 3), keepdim=True)))
        if k == "glu":
            a, b = self.f(x).chunk(2, dim=1)
            return a * torch.sigmoid(b)
        return self.f(x)


class RandomNet(nn.Module):
    def __init__(self, stem: int, blocks: list[tuple[str, int]], head: str, classes: int = 5):
        super().__init__()
        self.stem = _cbr(3, stem)
        layers, c = [], stem
        for kind, width in blocks:
            layers.append(Block(kind, c, width))
            c = layers[-1].out
        self.blocks = nn.Sequential(*layers)
        self.head_kind = head
        self.fc = nn.Linear(c * (16 if head == "flatten" else 1), classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = x.flatten(1) if self.head_kind == "flatten" else x.mean((2, 3))
        return self.fc(x)


@st.composite
def random_nets(draw) -> tuple[nn.Module, tuple[torch.Tensor]]:
    stem = draw(st.sampled_from([4, 6, 8]))
    n = draw(st.integers(1, 5))
    blocks = [(draw(st.sampled_from(BLOCKS)), draw(st.sampled_from([4, 6, 8]))) for _ in range(n)]
    head = draw(st.sampled_from(["pool", "flatten"]))
    seed = draw(st.integers(0, 2**16))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = randomize_bn(RandomNet(stem, blocks, head), seed).eval()
        x = torch.randn(2, 3, 4, 4)
    return model, (x,)
