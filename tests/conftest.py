"""One real gradtap server for the whole session, on port 0, with a temporary model repository."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from gradtap.client import Client
from gradtap.server import Settings, start
from gradtap.server.rpc.app import Running
from torch import nn

from . import models

os.environ["HF_HUB_OFFLINE"] = "1"  # no test downloads weights: models come from packages


@dataclass
class Served:
    address: str
    running: Running
    repository: Path
    modules: dict[str, nn.Module]


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    torch.manual_seed(0)
    repository = tmp_path_factory.mktemp("repository")
    modules = models.export_all(repository)
    running = start("127.0.0.1:0", Settings(device="cpu", model_repository=repository))
    yield Served(f"127.0.0.1:{running.port}", running, repository, modules)
    running.server.stop(None).wait()


@pytest.fixture(scope="session")
def address(served: Served) -> str:
    return served.address


@pytest.fixture
def client(address: str) -> Iterator[Client]:
    with Client(address, timeout=60) as c:
        yield c


@dataclass
class LanguageServed:
    """A server of the language models (tests/language_models.py), with their modules."""

    address: str
    modules: dict[str, nn.Module]
    repository: Path


@pytest.fixture(scope="session")
def lm_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LanguageServed]:
    """Exported on first use only: the MiniLM export takes seconds."""
    from . import language_models

    repository = tmp_path_factory.mktemp("lm-repository")
    modules = language_models.export_all(repository)
    running = start("127.0.0.1:0", Settings(device="cpu", model_repository=repository))
    yield LanguageServed(f"127.0.0.1:{running.port}", modules, repository)
    running.server.stop(None).wait()


@pytest.fixture
def lm_client(lm_served: LanguageServed) -> Iterator[Client]:
    with Client(lm_served.address, timeout=120) as c:
        yield c
