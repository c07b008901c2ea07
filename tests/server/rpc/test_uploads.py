"""Hostile uploads to a real server: each refused with its documented code and reason, the
server serving on, and nothing of them left in the registry."""

from __future__ import annotations

import hashlib
import io
import pickle
import secrets
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from gradtap.client import Client, GradtapError, Objective
from gradtap.server import Settings, start
from gradtap.server.rpc.app import Running

from gradtap.v1 import model_service_pb2 as ms
from gradtap.v1 import model_service_pb2_grpc as ms_grpc

from ... import models

ADMIN = secrets.token_urlsafe(24)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MAX_UPLOAD = 4 << 20


class _OpensFile:
    """Unpickling this creates the file it names: the canary for code execution."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tokens = tmp_path_factory.mktemp("uploads") / "tokens"
    tokens.write_text(f"{ADMIN} @admin\n")
    settings = Settings(
        device="cpu",
        builtins=False,
        auth_token_file=tokens,
        model_control=True,
        max_upload_bytes=MAX_UPLOAD,
    )
    server = start("127.0.0.1:0", settings)
    with Client(f"127.0.0.1:{server.port}", token=ADMIN, timeout=60) as admin:
        admin.load_model("steady", models.scale_archive(2.0))
    yield server
    server.server.stop(None).wait()


def header(name: str, data: bytes, **changes: object) -> ms.LoadModelRequest:
    fields: dict[str, object] = {
        "name": name,
        "size": len(data),
        "archive_digest": "sha256:" + hashlib.sha256(data).hexdigest(),
    }
    fields.update(changes)
    return ms.LoadModelRequest(header=ms.UploadHeader(**fields))  # type: ignore[arg-type]


def chunks(data: bytes, size: int = 1 << 16) -> list[ms.LoadModelRequest]:
    return [ms.LoadModelRequest(chunk=data[i : i + size]) for i in range(0, len(data), size)]


def send(running: Running, messages: list[ms.LoadModelRequest]) -> grpc.RpcError:
    """Sends a raw LoadModel stream, as a hostile client would; returns its error."""
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = ms_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.LoadModel(iter(messages), metadata=(("authorization", f"Bearer {ADMIN}"),))
    return failed.value


def reason(error: grpc.RpcError) -> str:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return str(info.reason)


def pickled_weights(canary: Path) -> bytes:
    """A real archive whose weights say they are pickled, and are: the canary object."""
    source = zipfile.ZipFile(io.BytesIO(models.scale_archive(1.0)))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            payload = source.read(info.filename)
            if info.filename.endswith("model_weights_config.json"):
                payload = payload.replace(b'"use_pickle": false', b'"use_pickle": true')
            elif "/weights/weight_" in info.filename:
                payload = pickle.dumps(_OpensFile(canary))
            target.writestr(info.filename, payload)
    return out.getvalue()


def zip_bomb() -> bytes:
    """1 MiB on the wire that claims, and holds, 256 MiB of zeros."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as bomb:
        with bomb.open("archive/data/weights/weight_0", "w", force_zip64=True) as member:
            zeros = bytes(1 << 20)
            for _ in range(256):
                member.write(zeros)
    return out.getvalue()


def assert_still_serving(running: Running) -> None:
    with Client(f"127.0.0.1:{running.port}", token=ADMIN, timeout=60) as admin:
        assert [m.name for m in admin.list_models()] == ["steady"]
        x = np.ones((2, 4), np.float32)
        r = admin.analyze("steady", x, [], Objective.sum())
        np.testing.assert_array_equal(r.outputs[0], x * 2)


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("raw pickle", "not a zip archive"),
        ("torch.save pickle", "exactly one program"),
        ("pickled weights", "is pickled"),
    ],
)
def test_pickles_are_refused_and_never_unpickled(
    running: Running, tmp_path: Path, kind: str, why: str
) -> None:
    canary = tmp_path / "executed"
    if kind == "raw pickle":
        payload = pickle.dumps(_OpensFile(canary))
    elif kind == "torch.save pickle":
        buffer = io.BytesIO()
        torch.save({"model": _OpensFile(canary)}, buffer)
        payload = buffer.getvalue()
    else:
        payload = pickled_weights(canary)
    with Client(f"127.0.0.1:{running.port}", token=ADMIN, timeout=60) as admin:
        with pytest.raises(GradtapError) as e:
            admin.load_model("hostile", payload)
    assert (e.value.code, e.value.reason) == (INVALID, "BAD_ARCHIVE")
    assert why in e.value.message
    assert not canary.exists()
    assert_still_serving(running)


def test_a_zip_bomb_is_refused_before_it_expands(running: Running) -> None:
    bomb = zip_bomb()
    assert len(bomb) < MAX_UPLOAD
    with Client(f"127.0.0.1:{running.port}", token=ADMIN, timeout=60) as admin:
        with pytest.raises(GradtapError) as e:
            admin.load_model("bomb", bomb)
    assert (e.value.code, e.value.reason) == (INVALID, "BAD_ARCHIVE")
    assert "expands" in e.value.message
    assert_still_serving(running)


def test_a_truncated_stream_is_refused(running: Running) -> None:
    data = models.scale_archive(3.0)
    error = send(running, [header("cut", data), *chunks(data[: len(data) // 2])])
    assert (error.code(), reason(error)) == (INVALID, "UPLOAD_TRUNCATED")
    assert_still_serving(running)


def test_more_bytes_than_declared_are_refused(running: Running) -> None:
    data = models.scale_archive(3.0)
    error = send(running, [header("long", data), *chunks(data), *chunks(b"extra")])
    assert (error.code(), reason(error)) == (INVALID, "UPLOAD_SIZE_MISMATCH")
    assert_still_serving(running)


def test_a_digest_mismatch_is_refused(running: Running) -> None:
    data = models.scale_archive(3.0)
    forged = header("forged", data, archive_digest="sha256:" + "0" * 64)
    error = send(running, [forged, *chunks(data)])
    assert (error.code(), reason(error)) == (INVALID, "UPLOAD_DIGEST_MISMATCH")
    assert_still_serving(running)


@pytest.mark.parametrize("name", ["../steady", "a/b", "..", "x" * 200, "a..b", ""])
def test_names_that_could_be_paths_are_refused_on_both_sides(running: Running, name: str) -> None:
    data = models.scale_archive(3.0)
    error = send(running, [header(name, data), *chunks(data)])
    expected = "MISSING_MODEL" if not name else "BAD_MODEL_NAME"
    assert (error.code(), reason(error)) == (INVALID, expected)
    with Client(f"127.0.0.1:{running.port}", token=ADMIN) as admin:
        with pytest.raises(ValueError, match="model name"):
            admin.load_model(name, data)
    assert_still_serving(running)


@pytest.mark.parametrize("version", ["../1", "1/2", "..", "v" * 65, "-1"])
def test_versions_that_could_be_paths_are_refused_on_both_sides(
    running: Running, version: str
) -> None:
    data = models.scale_archive(3.0)
    error = send(running, [header("steady", data, version=version), *chunks(data)])
    assert (error.code(), reason(error)) == (INVALID, "BAD_MODEL_VERSION")
    with Client(f"127.0.0.1:{running.port}", token=ADMIN) as admin:
        with pytest.raises(ValueError, match="version"):
            admin.load_model("steady", data, version=version)
    assert_still_serving(running)


def test_an_upload_over_the_cap_is_refused_from_its_header(running: Running) -> None:
    data = models.scale_archive(3.0)
    error = send(running, [header("huge", data, size=MAX_UPLOAD + 1)])
    assert (error.code(), reason(error)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "UPLOAD_TOO_LARGE")
    error = send(running, chunks(data))  # bytes before any header
    assert (error.code(), reason(error)) == (INVALID, "BAD_UPLOAD")
    assert_still_serving(running)


def test_a_failed_upload_leaves_the_version_it_replaces_serving(running: Running) -> None:
    with Client(f"127.0.0.1:{running.port}", token=ADMIN, timeout=60) as admin:
        with pytest.raises(GradtapError) as e:
            admin.load_model("steady", b"PK\x03\x04 not an archive", version="1")
        assert e.value.reason == "BAD_ARCHIVE"
        (steady,) = admin.list_models()
        assert [(v.version, v.state, v.reason) for v in steady.versions] == [("1", "READY", "")]
    assert_still_serving(running)
