"""The built-in zoo: the three networks of the seed examples, with fixed weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import ExportedProgram

from .registry import Registry

MAX_BATCH = 4096
"""Largest batch the built-in models accept."""


class SeedEncoder(nn.Module):
    """Seed example 1: a conv encoder, `modified_z = latent_z.mean(dim=[2, 3]) * 2`, a decoder.

    `modified_z` is the graph node `mul`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 16, kernel_size=3)
        self.decoder = nn.Linear(16, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        latent_z = self.encoder(image)
        modified_z = latent_z.mean(dim=[2, 3]) * 2
        return self.decoder(modified_z)  # type: ignore[no-any-return]


class SeedConvNet(nn.Module):
    """Seed example 2 (`MyModel`): returns `(logits, intermediate)`; `intermediate` is `relu_1`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.fc = nn.Linear(64 * 24 * 24, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.conv1(x))
        intermediate = F.relu(self.conv2(x))
        x = intermediate.view(x.size(0), -1)
        x = self.fc(x)
        return x, intermediate


class SeedMLP(nn.Module):
    """Seed example 3 (`SimpleNet`): returns `(logits, intermediate)`, `intermediate` = `relu_1`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.fc1(x))
        intermediate = F.relu(self.fc2(x))
        x = self.fc3(intermediate)
        return x, intermediate


BUILTINS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "seed-encoder": (SeedEncoder, (3, 28, 28)),
    "seed-convnet": (SeedConvNet, (3, 28, 28)),
    "seed-mlp": (SeedMLP, (784,)),
}
"""Name -> (module class, per-sample input shape). The batch dimension is dynamic."""


def builtin_module(name: str) -> nn.Module:
    """Builds a built-in model with its fixed weights (seed 0), in eval mode."""
    cls, _ = BUILTINS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls().eval()


def export_builtin(name: str) -> ExportedProgram:
    """Exports a built-in model with a dynamic batch dimension, as a user would."""
    module = builtin_module(name)
    _, sample_shape = BUILTINS[name]
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = torch.zeros(2, *sample_shape)
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def load_builtins(registry: Registry) -> None:
    """Exports and registers the seed zoo."""
    for name in BUILTINS:
        registry.add(name, "builtin", export_builtin(name))
