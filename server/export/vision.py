"""timm and torchvision models by name (random weights: pretrained weights are never
downloaded), and any module a factory of yours returns (python:MODULE:FACTORY)."""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

import torch
from torch import nn

from .source import ExportError, ExportOptions, Source

EXAMPLE_BATCH = 2
CHECK_BATCH = 3


def _imported(name: str, what: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as e:  # an ImportError, or a library that cannot load (torchvision)
        raise ExportError(f"{what} sources need {name}, which cannot be imported here: {e}") from e


def _first_parameter(module: nn.Module) -> str:
    for name, parameter in inspect.signature(module.forward).parameters.items():
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            return name
    raise ExportError(f"{type(module).__name__}.forward takes no positional input")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ExportError(f"--input-dtype {name!r} is not a torch dtype (float32, int64, ...)")
    return dtype


def _one_input(
    module: nn.Module, shape: tuple[int, ...], options: ExportOptions, description: str
) -> Source:
    """A model of one input, batch-first, with a dynamic batch."""
    dtype = _dtype(options.input_dtype)
    generator = torch.Generator().manual_seed(options.seed)

    def example(rows: int) -> torch.Tensor:
        if dtype.is_floating_point:
            return torch.randn((rows, *shape), generator=generator).to(dtype)
        return torch.randint(0, 2, (rows, *shape), generator=generator).to(dtype)

    name = _first_parameter(module)
    batch = torch.export.Dim("batch", min=options.batch[0], max=options.batch[1])
    return Source(
        module=module,
        inputs={name: example(options.rows(EXAMPLE_BATCH))},
        dims={name: {0: batch}},
        checks=[{name: example(options.rows(CHECK_BATCH))}],
        description=f"{description} (input {tuple(shape)} {options.input_dtype})",
    )


def timm_source(name: str, options: ExportOptions) -> Source:
    """timm:NAME, with random weights (seeded); the input is the model's default size."""
    timm = _imported("timm", "timm:")
    torch.manual_seed(options.seed)
    try:
        module = timm.create_model(name, pretrained=False)
    except Exception as e:
        raise ExportError(f"timm cannot create {name!r}: {e}") from e
    shape = options.input_shape or tuple(module.pretrained_cfg.get("input_size", (3, 224, 224)))
    return _one_input(module.eval(), tuple(shape), options, f"timm {name}")


def torchvision_source(name: str, options: ExportOptions) -> Source:
    """torchvision:NAME, with random weights (seeded); input 3x224x224 unless given."""
    _imported("torchvision", "torchvision:")
    models = _imported("torchvision.models", "torchvision:")
    torch.manual_seed(options.seed)
    try:
        module = models.get_model(name, weights=None)
    except Exception as e:
        raise ExportError(f"torchvision cannot create {name!r}: {e}") from e
    shape = options.input_shape or (3, 224, 224)
    return _one_input(module.eval(), tuple(shape), options, f"torchvision {name}")


def factory_source(text: str, options: ExportOptions) -> Source:
    """python:MODULE:FACTORY: FACTORY() returns the nn.Module; --input-shape gives one row of
    its input. MODULE is imported from the current directory or sys.path."""
    module_name, colon, factory_name = text.rpartition(":")
    if not colon or not module_name or not factory_name:
        raise ExportError(f"python:{text}: give python:MODULE:FACTORY, e.g. python:mymodels:build")
    if options.input_shape is None:
        raise ExportError("python: sources need --input-shape, one row of the input (3,224,224)")
    if "" not in sys.path:
        sys.path.insert(0, "")
    found = _imported(module_name, "python:")
    factory = getattr(found, factory_name, None)
    if not callable(factory):
        raise ExportError(f"{module_name} has no callable {factory_name!r}")
    torch.manual_seed(options.seed)
    module = factory()
    if not isinstance(module, nn.Module):
        raise ExportError(
            f"{module_name}.{factory_name}() returned a {type(module).__name__}, "
            "not a torch.nn.Module"
        )
    return _one_input(module.eval(), options.input_shape, options, f"{module_name}.{factory_name}")
