"""The benchmarks' models: a plain ResNet-18, a cheap big-output model, a ResNet-style block.

Each is exported with torch.export into a temporary repository, as a user would, and also
used in-process as the baselines' twin.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """ResNet's two-convolution residual block."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) for 1000 classes, written out without torchvision."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._layer(64, 64, 1)
        self.layer2 = self._layer(64, 128, 2)
        self.layer3 = self._layer(128, 256, 2)
        self.layer4 = self._layer(256, 512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _layer(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The logits and the outputs of layer1..layer4."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        taps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            taps.append(x)
        logits = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits, taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0]


RESNET_TARGETS = ("layer1", "layer2", "layer3", "layer4")


class Repeat(nn.Module):
    """A cheap model with a big output: (1, 1024) float32 repeated `rows` times."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.rows, 1)


REPEAT_WIDTH = 1024


def repeat_rows(size_bytes: int) -> int:
    """Rows of a Repeat model whose float32 output is `size_bytes` long."""
    rows, rest = divmod(size_bytes, REPEAT_WIDTH * 4)
    if rest or rows < 1:
        raise ValueError(f"{size_bytes} bytes is not a whole number of 4 KiB rows")
    return rows


def repeat_name(size_bytes: int) -> str:
    return f"repeat-{size_bytes >> 20}m"


class ResBlock(nn.Module):
    """A ResNet-style block at 16x16, shaped like tests/models.py's (eval-mode batch norm)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 5)

    def captured(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the output of conv1 (the benchmark's target)."""
        c1 = self.conv1(x)
        h = F.relu(self.bn1(c1))
        h = F.relu(h + self.bn2(self.conv2(h)))
        return self.fc(torch.flatten(self.pool(h), 1)), c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.captured(x)[0]


M = TypeVar("M", bound=nn.Module)


def build(cls: type[M], *args: int) -> M:
    """A model with fixed weights (seed 0), in eval mode, with non-trivial batch-norm stats."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = cls(*args).eval()
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    assert m.running_mean is not None and m.running_var is not None
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    return module


def export_resnet(directory: Path, batch: int, image: int) -> tuple[str, ResNet18]:
    module = build(ResNet18)
    program = torch.export.export(module, (torch.zeros(batch, 3, image, image),))
    torch.export.save(program, directory / "resnet18.pt2")
    return "resnet18", module


def export_repeat(directory: Path, size_bytes: int) -> str:
    name = repeat_name(size_bytes)
    program = torch.export.export(Repeat(repeat_rows(size_bytes)), (torch.zeros(1, REPEAT_WIDTH),))
    torch.export.save(program, directory / f"{name}.pt2")
    return name


def export_resblock(directory: Path) -> tuple[str, ResBlock]:
    module = build(ResBlock)
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.export.export(
        module, (torch.zeros(2, 3, 16, 16),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, directory / "resblock.pt2")
    return "resblock", module
