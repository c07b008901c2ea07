"""Poll mode on a real server: archives added, replaced (a broken one leaves the old version
serving) and removed while calls keep flowing."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gradtap.client import Client, GradtapError, ModelInfo, Objective
from gradtap.server import Settings, start

from ... import models
from ...serving import eventually

POLL_SECONDS = 0.1
X = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)


def put(path: Path, data: bytes) -> None:
    """Writes an archive as an operator should: elsewhere, then renamed into place."""
    path.parent.mkdir(exist_ok=True)
    staged = path.with_name(path.name + ".partial")
    staged.write_bytes(data)
    os.replace(staged, path)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    put(tmp_path / "scale" / "1.pt2", models.scale_archive(1.0))
    return tmp_path


@pytest.fixture
def client(repository: Path) -> Iterator[Client]:
    settings = Settings(
        device="cpu", builtins=False, model_repository=repository, poll_repository=POLL_SECONDS
    )
    running = start("127.0.0.1:0", settings)
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=30) as c:
            yield c
    finally:
        running.drain(0)


def model(c: Client, name: str = "scale") -> ModelInfo | None:
    return next((m for m in c.list_models() if m.name == name), None)


def versions(c: Client) -> list[tuple[str, str]]:
    info = model(c)
    return [] if info is None else [(v.version, v.state) for v in info.versions]


def served(c: Client, **pick: str) -> tuple[str, float]:
    """The version that serves a call, and its k (output / input)."""
    r = c.analyze("scale", X, [], Objective.sum(), **pick)
    ks = r.outputs[0][X > 0] / X[X > 0]
    assert np.allclose(ks, ks[0], rtol=1e-6)
    return r.metadata["model_version"], round(float(ks[0]), 4)


def test_poll_adds_replaces_and_removes_versions_while_calls_flow(
    client: Client, repository: Path
) -> None:
    failures: list[BaseException] = []
    seen: set[tuple[str, float]] = set()
    stop = threading.Event()

    def keep_calling() -> None:
        while not stop.is_set():
            try:
                seen.add(served(client))
            except (GradtapError, AssertionError) as e:
                failures.append(e)

    caller = threading.Thread(target=keep_calling)
    caller.start()
    try:
        assert served(client) == ("1", 1.0)
        # added: the newer version becomes the default once it is READY
        put(repository / "scale" / "2.pt2", models.scale_archive(2.0))
        assert eventually(lambda: served(client) == ("2", 2.0))
        assert client.health("gradtap.v1.model/scale") == "SERVING"

        # a broken newer version: FAILED with the loader's reason, version 2 serves on
        put(repository / "scale" / "3.pt2", b"PK\x03\x04 a torn upload")
        assert eventually(lambda: ("3", "FAILED") in versions(client))
        info = model(client)
        assert info is not None and info.default_version == "2"
        assert "zip" in next(v.reason for v in info.versions if v.version == "3")
        assert served(client) == ("2", 2.0)

        # a broken replacement of version 2 itself: the archive before it serves on
        put(repository / "scale" / "2.pt2", b"PK\x03\x04 torn in place")
        assert eventually(lambda: "reload failed" in _reason(client, "2"))
        assert served(client) == ("2", 2.0) and served(client, version="1") == ("1", 1.0)

        # the fixed archive replaces it in place
        put(repository / "scale" / "2.pt2", models.scale_archive(4.0))
        assert eventually(lambda: served(client) == ("2", 4.0))
        assert _reason(client, "2") == ""
    finally:
        stop.set()
        caller.join()
    assert failures == []
    assert seen <= {("1", 1.0), ("2", 2.0), ("2", 4.0)}  # each result its version's numbers

    # removed: version 2 goes and the default falls back to 1; then the failed 3; then all
    (repository / "scale" / "2.pt2").unlink()
    assert eventually(lambda: versions(client) == [("1", "READY"), ("3", "FAILED")])
    assert served(client) == ("1", 1.0)
    (repository / "scale" / "3.pt2").unlink()
    (repository / "scale" / "1.pt2").unlink()
    assert eventually(lambda: model(client) is None)
    assert client.health("gradtap.v1.model/scale") == "NOT_SERVING"


def test_poll_reads_a_flat_archive_as_version_1_and_skips_bad_names(
    client: Client, repository: Path
) -> None:
    put(repository / "flat.pt2", models.scale_archive(3.0))
    put(repository / "scale" / "..bad.pt2", models.scale_archive(3.0))
    put(repository / "bad name.pt2", models.scale_archive(3.0))
    assert eventually(lambda: model(client, "flat") is not None)
    flat = model(client, "flat")
    assert flat is not None and [(v.version, v.source) for v in flat.versions] == [
        ("1", "repository")
    ]
    assert {m.name for m in client.list_models()} == {"flat", "scale"}
    assert versions(client) == [("1", "READY")]


def _reason(c: Client, version: str) -> str:
    info = model(c)
    assert info is not None
    return next(v.reason for v in info.versions if v.version == version)
