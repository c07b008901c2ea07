"""Models the tests export into a temporary repository, as a user would with torch.export.save."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class TokenClassifier(nn.Module):
    """Two inputs: int64 token ids and a bool mask; the embedding output is the usual target."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.embed(ids)))
        h = (h * mask.unsqueeze(-1).to(h.dtype)).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        return self.head(h)  # type: ignore[no-any-return]


class ResBlock(nn.Module):
    """A ResNet-style block with eval-mode batch norm and a residual add."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(h + self.bn2(self.conv2(h)))
        return self.fc(torch.flatten(self.pool(h), 1))  # type: ignore[no-any-return]


class Wide(nn.Module):
    """A static-shape model whose activations are larger than gRPC's 4 MiB message limit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 96, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


def build(cls: type[nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        module = cls().eval()
    if isinstance(module, ResBlock):  # give batch norm non-trivial running statistics
        with torch.no_grad():
            for bn in (module.bn1, module.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    return module


def token_inputs(batch: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 50, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, -2:] = False
    return ids, mask


def export_all(directory: Path) -> dict[str, nn.Module]:
    """Writes NAME.pt2 archives into `directory`; returns the in-process twins by name."""
    batch = torch.export.Dim("batch", min=1, max=64)
    modules = {"tokens": build(TokenClassifier), "resblock": build(ResBlock), "wide": build(Wide)}
    programs = {
        "tokens": torch.export.export(
            modules["tokens"], token_inputs(), dynamic_shapes=({0: batch}, {0: batch})
        ),
        "resblock": torch.export.export(
            modules["resblock"], (torch.zeros(2, 3, 16, 16),), dynamic_shapes=({0: batch},)
        ),
        "wide": torch.export.export(modules["wide"], (torch.zeros(1, 3, 128, 128),)),
    }
    for name, program in programs.items():
        torch.export.save(program, directory / f"{name}.pt2")
    return modules


class Scale(nn.Module):
    """y = relu(x * w), every weight k: versions of one model whose outputs say which ran."""

    def __init__(self, k: float, width: int = 4) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((width,), float(k)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x * self.w)


@functools.cache
def scale_archive(k: float, width: int = 4) -> bytes:
    """The bytes of an exported Scale(k) archive, with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(
        Scale(k, width).eval(), (torch.ones(2, width),), dynamic_shapes=({0: batch},)
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()
