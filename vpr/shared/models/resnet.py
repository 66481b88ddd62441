"""ResNet-18 exactly as torchvision 0.29 builds it (``torchvision.models.resnet18``), without importing torchvision.

``import torchvision`` costs about as much as ``import torch`` again: the package's ``__init__`` imports
``torchvision.ops``, which imports ``torch._dynamo`` (sympy, triton...), and every command that builds a
model paid it although the backbone needs this one definition (BENCHMARKS.md, "Evaluation: whole
``vpr evaluate`` against the model bound"). Here is torchvision's ``ResNet(BasicBlock, [2, 2, 2, 2])``
(BSD-3-Clause, torchvision/models/resnet.py) with the options resnet18 never uses left out. What must
not change, and tests/test_resnet.py checks against torchvision itself:

- the module names and their order: the state dicts are torchvision's, key for key, so torchvision's
  ImageNet file (and any resnet18 checkpoint) loads unchanged;
- the order in which modules are built and initialised: each ``nn.Conv2d``/``nn.Linear`` draws its
  default init when built, then every convolution is re-drawn (Kaiming normal, fan-out) in module order,
  so the same seed gives the same weights, bit for bit (the untrained baseline depends on it);
- the forward pass, op for op (``out += identity`` in place, then ReLU): the same bits out.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (``downsample``: 1×1 projection when the shape changes)."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def make_layer(inplanes: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """One stage of ``blocks`` basic blocks; the projection is built first, as torchvision does (init order)."""
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
        )
    layers = [BasicBlock(inplanes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet18(nn.Module):
    """torchvision's ResNet-18: conv1 → bn1 → relu → maxpool → layer1…layer4 → avgpool → fc."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_layer(64, 64, 2)
        self.layer2 = make_layer(64, 128, 2, stride=2)
        self.layer3 = make_layer(128, 256, 2, stride=2)
        self.layer4 = make_layer(256, 512, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18() -> ResNet18:
    """A randomly initialised ResNet-18: ``torchvision.models.resnet18(weights=None)``, the same draws."""
    return ResNet18()
