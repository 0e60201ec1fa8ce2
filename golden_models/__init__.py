"""Golden models: deterministic definitions of real architectures, reachable by name.

ImageNet layouts (224x224, 1000 classes) serve speed and structure: built from a seed, with BatchNorm statistics
estimated from forward passes over seeded inputs (running mean 0 / variance 1 would make folding and calibration
tests vacuous).  Digits models (32x32, 10 classes, names ending in ``-digits``) are trained on scikit-learn's
handwritten digits (``train.py``); their weights are checked in under ``weights/`` and loaded with
``torch.load(weights_only=True)``.  ``-hard-digits`` models are trained and evaluated on the hard split.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from fxcompress.errors import InputError

from .densenet import densenet121
from .digits import digits
from .mobilenet import MobileNetV2, mobilenet_v2
from .resnet import resnet18, resnet20, resnet50, resnext50_32x4d
from .unet import unet
from .vgg import vgg11_bn, vgg_small
from .vit import vit_small, vit_tiny

HERE = Path(__file__).parent
WEIGHTS = HERE / "weights"
EXPECTED = HERE / "expected.json"


@dataclasses.dataclass(frozen=True)
class GoldenSpec:
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # of one example, batch size 1
    description: str
    seed: int = 0
    trained: bool = False  # weights come from weights/NAME.pt
    hard: bool = False  # trained and evaluated on the hard digits split


def _mobilenet_v2_digits() -> MobileNetV2:
    return MobileNetV2(num_classes=10, width_mult=0.5, first_stride=1)


_IMAGENET = (1, 3, 224, 224)
_DIGITS = (1, 3, 32, 32)
GOLDEN: dict[str, GoldenSpec] = {
    "resnet18": GoldenSpec(resnet18, _IMAGENET, "ResNet-18 (11,689,512 params)"),
    "resnet50": GoldenSpec(resnet50, _IMAGENET, "ResNet-50 (25,557,032 params)"),
    "mobilenet_v2": GoldenSpec(mobilenet_v2, _IMAGENET, "MobileNetV2 (3,504,872 params)"),
    "vgg11_bn": GoldenSpec(vgg11_bn, _IMAGENET, "VGG-11 with BatchNorm (132,868,840 params)"),
    "resnext50": GoldenSpec(resnext50_32x4d, _IMAGENET, "ResNeXt-50 32x4d, grouped convs (25,028,904 params)"),
    "densenet121": GoldenSpec(densenet121, _IMAGENET, "DenseNet-121, concat blocks (7,978,856 params)"),
    "unet": GoldenSpec(unet, _IMAGENET, "UNet, concat skips and ConvTranspose2d, 21-class segmentation"),
    "vit_small": GoldenSpec(vit_small, _IMAGENET, "ViT, patch 16, dim 192, depth 4, nn.MultiheadAttention"),
}
_TRAINED = {  # architecture name -> (factory, seed); "-hard-digits" twins for the CNNs
    "resnet20": (resnet20, 20, "ResNet-20"),
    "mobilenetv2": (_mobilenet_v2_digits, 21, "MobileNetV2 (width 0.5)"),
    "vgg-small": (vgg_small, 22, "VGG-small"),
    "vit-tiny": (vit_tiny, 23, "ViT-tiny"),
}
# ViT-tiny does not learn the hard split from 1,078 images (19% test accuracy after 120 epochs): no hard twin.
_HARD = ("resnet20", "mobilenetv2", "vgg-small")
for _arch, (_factory, _seed, _title) in _TRAINED.items():
    GOLDEN[f"{_arch}-digits"] = GoldenSpec(_factory, _DIGITS, f"{_title} trained on the digits", _seed, True)
    if _arch in _HARD:
        GOLDEN[f"{_arch}-hard-digits"] = GoldenSpec(_factory, _DIGITS, f"{_title} trained on the hard digits split",
                                                    _seed, True, True)

# How each digits model is trained (train.py): optimizer, peak learning rate, weight decay, epochs.
_RECIPES = {
    "resnet20": {"opt": "sgd", "lr": 0.1, "wd": 5e-4, "epochs": 30},
    "mobilenetv2": {"opt": "adamw", "lr": 3e-3, "wd": 0.01, "epochs": 60},
    "vgg-small": {"opt": "sgd", "lr": 0.05, "wd": 5e-4, "epochs": 30},
    "vit-tiny": {"opt": "adamw", "lr": 1e-3, "wd": 0.05, "epochs": 120},
}
_OVERRIDES = {"vgg-small-hard-digits": {"epochs": 80}}  # the hard split takes longer to fit
DIGITS_TRAINING = {name: _RECIPES[name.rsplit("-digits")[0].removesuffix("-hard")] | _OVERRIDES.get(name, {})
                   for name, spec in GOLDEN.items() if spec.trained}


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


def build_architecture(name: str) -> nn.Module:
    """The untrained architecture of ``name``, initialised from its seed."""
    spec = GOLDEN[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return spec.factory()


def build(name: str, batch_size: int = 1) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:

    spec = GOLDEN[name]
    model = build_architecture(name)
    if spec.trained:
        path = WEIGHTS / f"{name}.pt"
        if not path.is_file():
            raise InputError(f"golden model {name!r} has no weights at {path}; train it with "
                             f"python -m fxcompress.golden_models.train {name}")
        model.load_state_dict(torch.load(path, weights_only=True))
        images, _ = digits("test", hard=spec.hard)
        return model.eval(), (images[:batch_size].clone(),)
    estimate_bn_statistics(model, spec.input_shape, seed=spec.seed)
    example = torch.randn((batch_size, *spec.input_shape[1:]), generator=torch.Generator().manual_seed(spec.seed + 1))
    return model.eval(), (example,)
