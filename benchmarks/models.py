"""Models the benchmarks use, built in code with random weights (no downloads).

The deep MLP is the demo's (``sugarize.app.demo.DeepMLP``) at a larger size."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


class FGI(nn.Module):
    """The paper's forward gradient injection: y = s(x) - sg(s(x)) + sg(relu(x)), B-SiLU."""

    def __init__(self, alpha: float = 1.67):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        s = (x + self.alpha) * torch.sigmoid(x) - self.alpha / 2
        return s - s.detach() + torch.relu(x).detach()


class Block(nn.Module):
    def __init__(self, cin, cout, stride, act):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = act()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = act()
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (CIFAR layout: 3x3 stem, no max-pool), 17 activation sites."""

    def __init__(self, act: Callable[[], nn.Module] = nn.ReLU, classes: int = 10, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), act())
        layers, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            layers += [Block(cin, cout, 1 if i == 0 else 2, act), Block(cout, cout, 1, act)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "ReLU": nn.ReLU,
    "LeakyReLU": nn.LeakyReLU,
    "GELU": nn.GELU,
    "SiLU": nn.SiLU,
    "SUGAR by FGI (B-SiLU)": FGI,
}


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce, 3x3, 1x1 expand (x4), BatchNorm after each, the shortcut added
    before the last ReLU (a 1x1 conv + BatchNorm where the shape changes), written as torchvision does."""

    expansion = 4

    def __init__(self, cin, width, stride, act):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = act()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    """ResNet-50 (3, 4, 6, 3 bottlenecks; 7x7 stride-2 stem and max-pool), 49 activation sites."""

    def __init__(self, act: Callable[[], nn.Module] = nn.ReLU, classes: int = 10, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), act(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], width
        for i, n in enumerate((3, 4, 6, 3)):
            w = width * 2 ** i
            for j in range(n):
                blocks.append(Bottleneck(cin, w, 2 if (j == 0 and i > 0) else 1, act))
                cin = w * Bottleneck.expansion
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
