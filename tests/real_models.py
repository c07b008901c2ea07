"""Real architectures on small configurations, one per family, exported with `gradtap export`
as a user would: Hugging Face directories holding only a config.json (random weights, seeded;
the configurations are bench/architectures.py's suite size), and a factory of ours
(python:MODULE:FACTORY).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.architectures import ARCHITECTURES, Architecture

FAMILIES = ("gpt2", "llama", "bert", "t5", "vit", "whisper")
"""causal LM (GPT-2, Llama with grouped-query attention), text encoder, encoder-decoder,
vision and speech: the Hugging Face families of issue 10, at their suite size
(bench/architectures.py)."""


def architecture(key: str) -> Architecture:
    return next(a for a in ARCHITECTURES if a.key == key)


def config_directory(family: str, root: Path) -> Path:
    """A directory holding only the family's config.json at its suite size: `gradtap export
    hf:DIR` builds the model with random weights, seeded."""
    source = architecture(family).ways[0].source("suite", root)
    return Path(source.removeprefix("hf:"))


class InPlaceBlock(nn.Module):
    """A resnet-style block whose export keeps in-place operators (relu_, add_), with a ReLU
    module called three times and an in-place write into a view (which cannot be undone)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.conv2(h)
        h += x
        h = self.relu(h) + 1.0
        head = h[:, :1]
        head.mul_(2.0)  # a write through a view: stays in place
        pooled = F.adaptive_avg_pool2d(self.relu(h - 0.5), 1).flatten(1)
        return self.fc(pooled)  # type: ignore[no-any-return]


def in_place_block() -> nn.Module:
    """The factory `gradtap export python:tests.real_models:in_place_block` calls."""
    block = InPlaceBlock().eval()
    with torch.no_grad():
        block.bn1.running_mean.uniform_(-0.5, 0.5)
        block.bn1.running_var.uniform_(0.5, 2.0)
    return block
