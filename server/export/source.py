"""What a source gives the exporter: a module, its example inputs and their dynamic
dimensions; and the options and error every source shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class ExportError(Exception):
    """An export that cannot be done, with its cause in the user's words."""


Progress = Callable[[str], None]


def _quiet(message: str) -> None:
    del message


@dataclass(frozen=True)
class ExportOptions:
    """How to export: the ranges of the dynamic dimensions, the input of a factory or image
    model, the seed of random weights and the tolerance of the check."""

    batch: tuple[int, int] = (1, 64)
    """The batch dimension's range."""
    sequence: tuple[int, int] | None = None
    """The sequence dimension's range (text models); by default 2 to the model's longest."""
    input_shape: tuple[int, ...] | None = None
    """One row of the input, without the batch dimension (factories, image models)."""
    input_dtype: str = "float32"
    seed: int = 0
    """Seeds random weights (a config without weights, timm and torchvision) and inputs."""
    rtol: float = 1e-4
    atol: float = 1e-5
    progress: Progress = _quiet

    def rows(self, wanted: int) -> int:
        """A batch size for an example or check input: `wanted`, within the batch range."""
        return clamp(wanted, self.batch)


def clamp(wanted: int, bounds: tuple[int, int]) -> int:
    """`wanted`, moved into [low, high]."""
    return min(max(wanted, bounds[0]), bounds[1])


@dataclass
class Source:
    """A module ready to export: example inputs by name, their dynamic dimensions, the
    inputs the check compares on, and files the archive carries."""

    module: nn.Module
    inputs: dict[str, Any]
    """Keyword arguments of the export; non-tensors are fixed at export (use_cache=False)."""
    dims: dict[str, dict[int, torch.export.Dim]]
    """Per tensor input: its dynamic dimensions."""
    checks: list[dict[str, Any]] = field(default_factory=list)
    """Further inputs to compare the archive and the module on (other sizes)."""
    extra_files: dict[str, str] = field(default_factory=dict)
    description: str = ""
    padded_check: bool = False
    """A causal language model: also check that a left-padded row gives what it gives alone."""
    options: dict[str, Any] = field(default_factory=dict)
    """gradtap options the archive carries besides the dimension names (a padding
    declaration: server/models/padding.py)."""
