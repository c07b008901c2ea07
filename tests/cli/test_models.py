"""`gradtap models load|unload|default` and `--version`, as subprocesses against a real server
with model control and a model repository."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gradtap.client import Client
from gradtap.server import Settings, start

from .. import models
from .running import gradtap

ADMIN = secrets.token_urlsafe(24)
USER = secrets.token_urlsafe(24)


@dataclass
class Server:
    address: str
    repository: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("cli-models")
    (directory / "repo").mkdir()
    (directory / "repo" / "scale.pt2").write_bytes(models.scale_archive(1.0))
    (directory / "tokens").write_text(f"{ADMIN} @admin\n{USER}\n")
    settings = Settings(
        device="cpu",
        builtins=False,
        model_repository=directory / "repo",
        auth_token_file=directory / "tokens",
        model_control=True,
    )
    running = start("127.0.0.1:0", settings)
    yield Server(f"127.0.0.1:{running.port}", directory / "repo")
    running.server.stop(None).wait()


def run(server: Server, *args: str, token: str = ADMIN) -> str:
    result = gradtap(*args, GRADTAP_ADDRESS=server.address, GRADTAP_TOKEN=token)
    assert result.returncode == 0, result.stderr
    return result.stdout


def rows(server: Server) -> list[list[str]]:
    return [line.split() for line in run(server, "models").splitlines()[1:]]


def test_load_default_and_unload_versions_from_the_command_line(
    server: Server, tmp_path: Path
) -> None:
    archive = tmp_path / "scale-2.pt2"
    archive.write_bytes(models.scale_archive(2.0))
    with Client(server.address, token=ADMIN) as client:
        digest = client.describe("scale").digest
    out = run(server, "models", "load", "scale", str(archive), "--version", "2")
    assert out.startswith("scale version 2 is READY (sha256:")
    assert rows(server) == [
        ["scale", "1", "READY", "repository", digest],
        ["scale", "2*", "READY", "upload", out.split("(")[1].rstrip(")\n")],
    ]
    pinned = run(server, "models", "default", "scale", "1")
    assert "scale: default version 1" in pinned and " 1*  " in pinned
    assert "version 2 " in run(server, "analyze", "scale", "--version", "2")
    assert "default version 2" in run(server, "models", "default", "scale")  # unpinned
    out = run(server, "models", "unload", "scale", "--version", "2")
    assert "default version 1" in out and "2*" not in out


def test_load_without_an_archive_reloads_the_repository(server: Server) -> None:
    (server.repository / "scale.pt2").write_bytes(models.scale_archive(5.0))
    out = run(server, "models", "load", "scale")
    assert "scale: default version 1" in out
    with Client(server.address, token=ADMIN) as client:
        r = client.analyze("scale", np.ones((1, 4), np.float32), [])
    assert r.outputs[0].tolist() == [[5.0] * 4]


def test_model_control_without_the_admin_scope_is_an_error(server: Server, tmp_path: Path) -> None:
    result = gradtap(
        "models", "unload", "scale", GRADTAP_ADDRESS=server.address, GRADTAP_TOKEN=USER
    )
    assert result.returncode == 1
    assert "PERMISSION_DENIED" in result.stderr and "ADMIN_REQUIRED" in result.stderr
    archive = tmp_path / "scale.pt2"
    archive.write_bytes(models.scale_archive(1.0))
    for args in (["load", "../scale", str(archive)], ["unload", "scale", "--version", "../1"]):
        result = gradtap("models", *args, GRADTAP_ADDRESS=server.address, GRADTAP_TOKEN=ADMIN)
        assert result.returncode == 2 and "without '..'" in result.stderr  # a usage error
        assert "Traceback" not in result.stderr
    result = gradtap("analyze", "scale", "--version", "a/b", GRADTAP_ADDRESS=server.address)
    assert result.returncode == 2 and "Traceback" not in result.stderr
