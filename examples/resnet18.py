"""ResNet-18 for ``check-model``, written out as torchvision builds it (``torchvision.models.resnet18``):
a 7x7 stride-2 stem with BatchNorm and max pooling, four stages of two ``BasicBlock`` s (3x3 convolutions,
BatchNorm, ReLU, a 1x1 projection where the shape changes) at 64, 128, 256 and 512 channels, global
average pooling and a linear head, with torchvision's initialisation (Kaiming-normal convolutions, BatchNorm
weights 1 and biases 0). Trained with SGD (lr 0.005, momentum 0.9) on random 32x32 images and labels, the
setting in which FP32 itself, started one ulp away, drifts as far as FP16 does::

    python -m harness check-model examples.resnet18:factory --steps 8 --device cpu

``factory(width=16)`` keeps the layout at a quarter of the channels (a cheaper test).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, ReLU between and after, and the identity (or a 1x1 strided
    projection with BatchNorm) added before the last ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = (nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                           if stride != 1 or inplanes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout; ``width`` is the first stage's channels (64 in the original)."""

    def __init__(self, classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(width, 1)
        self.layer2 = self._stage(2 * width, 2)
        self.layer3 = self._stage(4 * width, 2)
        self.layer4 = self._stage(8 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _stage(self, planes: int, stride: int) -> nn.Sequential:
        blocks = nn.Sequential(BasicBlock(self.inplanes, planes, stride), BasicBlock(planes, planes))
        self.inplanes = planes
        return blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def factory(width: int = 64, image: int = 32, batch: int = 8) -> dict:
    """The check-model factory: random images and labels, cross-entropy, SGD lr 0.005 momentum 0.9."""
    torch.manual_seed(0)
    model = ResNet18(width=width)

    def data(step: int) -> tuple:
        g = torch.Generator().manual_seed(step)
        return torch.randn(batch, 3, image, image, generator=g), torch.randint(0, 10, (batch,), generator=g)

    return {"model": model, "batch": data, "loss": lambda m, b: F.cross_entropy(m(b[0]).float(), b[1]),
            "optimizer": lambda ps: torch.optim.SGD(ps, lr=0.005, momentum=0.9)}
