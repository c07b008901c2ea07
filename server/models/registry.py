"""The served models by name, and the repository of archives they are loaded from."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.export import ExportedProgram

from ..errors import ModelLoadError
from .archive import read_archive
from .model import Model, prepare
from .structures import Renamed

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Every model name matches this; names are looked up in a dict, never joined into paths."""


class Registry:
    """The served models by name."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._models: dict[str, Model] = {}

    def add(
        self,
        name: str,
        source: str,
        program: ExportedProgram,
        *,
        dims: dict[str, str] | None = None,
        renamed: Sequence[Renamed] = (),
    ) -> Model:
        if not MODEL_NAME.fullmatch(name):
            raise ModelLoadError(f"model name {name!r} does not match {MODEL_NAME.pattern}")
        if name in self._models:
            raise ModelLoadError(f"model {name!r} is defined twice")
        model = prepare(name, source, program, self.device, dims=dims, renamed=renamed)
        self._models[name] = model
        return model

    def get(self, name: str) -> Model | None:
        return self._models.get(name) if MODEL_NAME.fullmatch(name) else None

    def __iter__(self) -> Iterator[Model]:
        return iter(sorted(self._models.values(), key=lambda m: m.name))

    def __len__(self) -> int:
        return len(self._models)


def load_repository(registry: Registry, directory: Path) -> list[str]:
    """Loads every NAME.pt2 in `directory`; returns the names of archives it refused."""
    refused = []
    for path in sorted(directory.glob("*.pt2")):
        name = path.name[: -len(".pt2")]
        try:
            if not path.is_file():
                raise ModelLoadError("not a regular file")
            archive = read_archive(path.read_bytes())
            options = archive.options
            model = registry.add(
                name,
                "repository",
                archive.program,
                dims=options.get("dims"),
                renamed=archive.renamed,
            )
            model.batchable = bool(options.get("batching", True))
            for renamed in archive.renamed:
                log.info(
                    "%s: serving its %s, a %s, as the fields %s",
                    path.name,
                    renamed.where,
                    renamed.type,
                    ", ".join(renamed.fields),
                )
        except ModelLoadError as e:
            log.error("refusing model archive %s: %s", path.name, e)
            refused.append(name)
    return refused
