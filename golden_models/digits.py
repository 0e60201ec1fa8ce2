"""scikit-learn's handwritten digits (1,797 real 8x8 scans), shaped for the 32x32 golden models.

The scans are upsampled to 32x32 (bilinear), repeated over 3 channels and standardised with the training split's
mean and standard deviation.  The split is fixed by a seed: 60% train, 20% val, 20% test.  ``hard=True`` applies a
seeded random rotation, shift, scale and Gaussian noise to every image (the same ones on every call), a harder
version of the same data on which fp32 accuracy is well below 100%, so that compression losses show.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from fxcompress.errors import InputError, unknown_name_message

SPLITS = ("train", "val", "test")
SEED = 2024
SIZE = 32
HARD = {"degrees": 55.0, "shift": 0.3, "scale": (0.6, 1.2), "noise": 1.6}  # shift: fraction of the image


def _raw() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    return images, torch.tensor(data.target, dtype=torch.int64)


def _indices(n: int) -> dict[str, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED))
    a, b = int(0.6 * n), int(0.8 * n)
    return {"train": order[:a], "val": order[a:b], "test": order[b:]}


def harden(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The hard split's transform: seeded rotation, shift, scale and noise of raw (N, 1, S, S) images."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(HARD["degrees"])
    lo, hi = HARD["scale"]
    scale = lo + torch.rand(n, generator=g) * (hi - lo)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * HARD["shift"] * 2  # affine_grid works in [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    return x + torch.randn(x.shape, generator=g) * HARD["noise"] * x.std()


def raw_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unstandardised (N, 1, 32, 32) images in [0, 1] and labels of one split."""
    if split not in SPLITS:

        raise InputError(unknown_name_message("split", split, SPLITS))
    images, labels = _raw()
    idx = _indices(len(labels))[split]
    return F.interpolate(images[idx].unsqueeze(1), size=(SIZE, SIZE), mode="bilinear", align_corners=False), labels[idx]


@functools.cache
def _train_statistics() -> tuple[float, float]:
    train, _ = raw_split("train")
    return float(train.mean()), float(train.std())


def standardize(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) raw images -> (N, 3, S, S) with the training split's mean and standard deviation."""
    mean, std = _train_statistics()
    return ((x - mean) / std).repeat(1, 3, 1, 1).contiguous()


def digits(split: str, hard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: images (N, 3, 32, 32) float32 standardised, labels (N,) int64."""
    x, labels = raw_split(split)
    if hard:
        x = harden(x, SEED + SPLITS.index(split) + 1)
    return standardize(x), labels
