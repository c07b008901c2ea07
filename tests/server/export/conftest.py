"""One server for the real-model tests: every family exported once per session with
`gradtap export`'s code, into a repository of its own, served on port 0."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from gradtap.server import Settings, start
from gradtap.server.export import Exported, ExportOptions, export
from gradtap.server.rpc.app import Running

from ...real_models import FAMILIES, config_directory

SEQUENCE = (2, 32)
"""The sequence range the text models are exported with."""


@dataclass
class RealServed:
    address: str
    running: Running
    directories: dict[str, Path]
    """The Hugging Face config directory each family was exported from."""
    exported: dict[str, Exported] = field(default_factory=dict)


@pytest.fixture(scope="session")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServed]:
    pytest.importorskip("transformers", reason="the real-model tests need transformers")
    configs = tmp_path_factory.mktemp("configs")
    repository = tmp_path_factory.mktemp("real-repository")
    directories = {family: config_directory(family, configs) for family in FAMILIES}
    exported: dict[str, Exported] = {}
    for family, directory in directories.items():
        exported[family] = export(f"hf:{directory}", ExportOptions(sequence=SEQUENCE))
    exported["block"] = export(
        "python:tests.real_models:in_place_block", ExportOptions(input_shape=(4, 8, 8))
    )
    for name, result in exported.items():
        (repository / f"{name}.pt2").write_bytes(result.data)
    running = start(
        "127.0.0.1:0", Settings(device="cpu", model_repository=repository, builtins=False)
    )
    torch.manual_seed(0)
    yield RealServed(f"127.0.0.1:{running.port}", running, directories, exported)
    running.server.stop(None).wait()
