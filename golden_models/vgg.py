"""VGG with BatchNorm (Simonyan & Zisserman 2015); configuration "A" is VGG-11."""
from __future__ import annotations

import torch
import torch.nn as nn

CONFIGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],  # VGG-11
    "S": [32, "M", 64, "M", 128, 128, "M", 256, 256, "M"],  # VGG-small, for 32x32 inputs
}


class VGG(nn.Module):
    def __init__(self, config: str = "A", num_classes: int = 1000, width: float = 1.0, hidden: int = 4096,
                 pool: int = 7, hidden_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in CONFIGS[config]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                cout = int(v * width)
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        dims = [cin * pool * pool] + [hidden] * hidden_layers
        mlp: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            mlp += [nn.Linear(a, b), nn.ReLU(True), nn.Dropout()]
        self.classifier = nn.Sequential(*mlp, nn.Linear(dims[-1], num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg11_bn(num_classes: int = 1000) -> VGG:
    return VGG("A", num_classes)


def vgg_small(num_classes: int = 10) -> VGG:
    """VGG-small for 32x32 inputs: 6 conv+BN layers, a 2x2 pool and a two-layer MLP classifier."""
    return VGG("S", num_classes, hidden=256, pool=2, hidden_layers=1)
