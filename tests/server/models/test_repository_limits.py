"""One bad archive never stops the server: each is logged, shows FAILED with its reason, and
the others (the built-in ones too) are served; files are checked before they are read."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from gradtap.client import Client, GradtapError, Objective
from gradtap.server import Settings, start
from gradtap.server.models.repository import MAX_ARCHIVE_BYTES
from gradtap.server.rpc.app import Running

from ... import models

GOOD = models.scale_archive(2.0)
SPARSE_BYTES = 5 << 30


def rewrite(edit: Callable[[str, bytes], bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A copy of the good archive with every member passed through `edit(name, payload)`."""
    source = zipfile.ZipFile(io.BytesIO(GOOD))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as target:
        for info in source.infolist():
            target.writestr(info.filename, edit(info.filename, source.read(info.filename)))
    return out.getvalue()


def member(suffix: str, payload: bytes) -> Callable[[str, bytes], bytes]:
    return lambda name, old: payload if name.endswith(suffix) else old


def bad_crc() -> bytes:
    """The good archive with one byte of models/model.json flipped (its CRC no longer holds)."""
    data = bytearray(GOOD)
    info = next(
        i for i in zipfile.ZipFile(io.BytesIO(GOOD)).infolist() if i.filename.endswith(".json")
    )
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    data[info.header_offset + 30 + name_len + extra_len + 1] ^= 0xFF
    return bytes(data)


def zip_bomb() -> bytes:
    """A small file whose one extra member declares and expands to 256 MiB of zeros."""
    root = zipfile.ZipFile(io.BytesIO(GOOD)).namelist()[0].split("/")[0]
    out = io.BytesIO(GOOD)
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open(f"{root}/data/weights/zeros", "w", force_zip64=True) as f:
            zeros = bytes(16 << 20)
            for _ in range(16):
                f.write(zeros)
    return out.getvalue()


BROKEN = {
    "crc": (bad_crc, "the archive is corrupt: Bad CRC-32"),
    "badjson": (
        lambda: rewrite(member("models/model.json", b"{not json")),
        "models/model.json is not valid JSON",
    ),
    "wrongtype": (
        lambda: rewrite(member("model_weights_config.json", b"[1, 2]")),
        "model_weights_config.json must hold a JSON object, not list",
    ),
    "wrongfield": (
        lambda: rewrite(member("model_weights_config.json", json.dumps({"config": [1]}).encode())),
        "the weights' config must map names to JSON objects",
    ),
    "bomb": (zip_bomb, "more than 100 times"),
}


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory beside the repository: a good archive and a 5 GiB sparse file."""
    directory = tmp_path_factory.mktemp("outside")
    (directory / "good.pt2").write_bytes(GOOD)
    with open(directory / "sparse.pt2", "wb") as f:
        f.truncate(SPARSE_BYTES)
    return directory


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, outside: Path) -> Path:
    directory = tmp_path_factory.mktemp("repository")
    (directory / "good.pt2").write_bytes(GOOD)
    for name, (make, _) in BROKEN.items():
        (directory / f"{name}.pt2").write_bytes(make())
    (directory / "linked.pt2").symlink_to(directory / "good.pt2")  # inside: followed
    (directory / "escape.pt2").symlink_to(outside / "good.pt2")  # outside: refused
    (directory / "sparselink.pt2").symlink_to(outside / "sparse.pt2")
    with open(directory / "sparse.pt2", "wb") as f:  # inside, under the cap: not a zip
        f.truncate(SPARSE_BYTES)
    (directory / "versions").mkdir()
    (directory / "versions" / "1.pt2").write_bytes(GOOD)
    with open(directory / "versions" / "2.pt2", "wb") as f:  # over the cap set below
        f.truncate(MAX_ARCHIVE_BYTES + 1)
    return directory


def peak_rss() -> int:
    """This process's peak resident set since it was last reset (VmHWM), in bytes."""
    status = Path("/proc/self/status").read_text()
    return (
        int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
        << 10
    )


STARTUP: dict[str, int] = {}


@pytest.fixture(scope="module")
def served(repository: Path) -> Iterator[Running]:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = peak_rss()
    running = start("127.0.0.1:0", Settings(device="cpu", model_repository=repository))
    STARTUP["peak growth"] = peak_rss() - before
    yield running
    running.server.stop(None).wait()


@pytest.fixture(scope="module")
def client(served: Running) -> Iterator[Client]:
    with Client(f"127.0.0.1:{served.port}", timeout=60) as c:
        yield c


def test_each_bad_archive_shows_failed_with_its_reason(client: Client) -> None:
    listed = {m.name: m for m in client.list_models()}
    for name, (_, reason) in BROKEN.items():
        assert listed[name].state == "FAILED", name
        assert reason in listed[name].reason, (name, listed[name].reason)
        with pytest.raises(GradtapError) as failed:
            client.describe(name)
        assert failed.value.reason == "MODEL_FAILED" and reason in failed.value.message


def test_the_others_are_served_built_in_ones_too(client: Client) -> None:
    listed = {m.name: m for m in client.list_models()}
    for name in ("good", "linked", "seed-mlp", "seed-convnet", "seed-encoder"):
        assert listed[name].state == "READY", name
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    for name in ("good", "linked"):
        r = client.analyze(name, x, [], Objective.sum(), input_grads=True)
        np.testing.assert_allclose(r.outputs[0], np.maximum(x * 2, 0), rtol=0, atol=0)
        np.testing.assert_allclose(r.input_grads[0], 2.0 * (x > 0), rtol=0, atol=0)
    assert client.health() == "SERVING"


def test_links_out_of_the_repository_are_refused(client: Client) -> None:
    listed = {m.name: m for m in client.list_models()}
    for name in ("escape", "sparselink"):
        assert listed[name].state == "FAILED"
        assert "symbolic link leading out of the model repository" in listed[name].reason


def test_large_files_are_refused_without_being_read(client: Client) -> None:
    listed = {m.name: m for m in client.list_models()}
    assert listed["sparse"].state == "FAILED"
    assert "not a zip archive" in listed["sparse"].reason
    versions = {v.version: v for v in listed["versions"].versions}
    assert versions["1"].state == "READY" and versions["2"].state == "FAILED"
    assert f"over the limit of {MAX_ARCHIVE_BYTES}" in versions["2"].reason
    assert "--max-archive-bytes" in versions["2"].reason
    # Reading any of the 5 GiB files whole, or unpacking the bomb, would pass this.
    assert STARTUP["peak growth"] < 1 << 30, f"start-up grew by {STARTUP['peak growth'] >> 20} MiB"


def test_the_cap_is_a_flag_on_the_total_declared_size(tmp_path: Path) -> None:
    deflated = rewrite(lambda name, payload: payload, zipfile.ZIP_DEFLATED)
    (tmp_path / "good.pt2").write_bytes(deflated)
    limit = len(deflated) + 64  # the file fits, its members' unpacked total does not
    declared = sum(i.file_size for i in zipfile.ZipFile(io.BytesIO(deflated)).infolist())
    assert declared > limit
    running = start(
        "127.0.0.1:0",
        Settings(device="cpu", builtins=False, model_repository=tmp_path, max_archive_bytes=limit),
    )
    try:
        status = running.registry.status("good")
        assert status is not None and status.state.value == "FAILED"
        assert f"expands past {limit} bytes" in status.reason
    finally:
        running.server.stop(None).wait()
