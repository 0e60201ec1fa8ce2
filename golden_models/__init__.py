"""Golden models: deterministic definitions of real architectures, reachable by name.

Each entry builds its model from a seed (no downloads), estimates realistic BatchNorm statistics from forward
passes over seeded inputs (running mean 0 / variance 1 would make folding and calibration tests vacuous), and
returns it in eval mode with a seeded example input.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn

from .mobilenet import mobilenet_v2
from .resnet import resnet18, resnet50
from .vgg import vgg11_bn


@dataclasses.dataclass(frozen=True)
class GoldenSpec:
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # of one example, batch size 1
    description: str
    seed: int = 0


GOLDEN: dict[str, GoldenSpec] = {
    "resnet18": GoldenSpec(resnet18, (1, 3, 224, 224), "ResNet-18, ImageNet layout (11,689,512 params)"),
    "resnet50": GoldenSpec(resnet50, (1, 3, 224, 224), "ResNet-50, ImageNet layout (25,557,032 params)"),
    "mobilenet_v2": GoldenSpec(mobilenet_v2, (1, 3, 224, 224), "MobileNetV2, ImageNet layout (3,504,872 params)"),
    "vgg11_bn": GoldenSpec(vgg11_bn, (1, 3, 224, 224), "VGG-11 with BatchNorm, ImageNet layout"),
}


@torch.no_grad()
def estimate_bn_statistics(model: nn.Module, input_shape: tuple[int, ...], batches: int = 2, batch_size: int = 4,
                           seed: int = 0) -> nn.Module:
    """Set every BatchNorm's running statistics to the exact average over seeded inputs (momentum=None)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(batches):
        model(torch.randn((batch_size, *input_shape[1:]), generator=generator))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return model.eval()


def build(name: str, batch_size: int = 1) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    spec = GOLDEN[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = spec.factory()
    estimate_bn_statistics(model, spec.input_shape, seed=spec.seed)
    example = torch.randn((batch_size, *spec.input_shape[1:]), generator=torch.Generator().manual_seed(spec.seed + 1))
    return model.eval(), (example,)
