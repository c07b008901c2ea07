"""Model control on a real server: uploads that serve, versions replaced under load without a
failed call, unloads that let running calls finish, and the admin scope."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from gradtap.client import Client, GradtapError, Objective, aio
from gradtap.client import _calls as calls
from gradtap.server import Settings, start
from gradtap.server.rpc.app import Running

from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

from ... import models
from ...serving import eventually, metric

ADMIN = secrets.token_urlsafe(24)
USER = secrets.token_urlsafe(24)
SCALE_ONLY = secrets.token_urlsafe(24)
X = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
RTOL = 1e-6


@dataclass
class Server:
    running: Running
    address: str

    def admin(self) -> Client:
        return Client(self.address, token=ADMIN, timeout=60)

    def user(self) -> Client:
        return Client(self.address, token=USER, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tokens = tmp_path_factory.mktemp("control") / "tokens"
    tokens.write_text(f"{ADMIN} @admin\n{USER}\n{SCALE_ONLY} scale\n")
    settings = Settings(
        device="cpu",
        builtins=True,
        auth_token_file=tokens,
        model_control=True,
        max_upload_bytes=1 << 20,
        metrics_port=0,
    )
    running = start("127.0.0.1:0", settings)
    yield Server(running, f"127.0.0.1:{running.port}")
    running.server.stop(None).wait()


def expected(k: float, x: np.ndarray = X) -> np.ndarray:
    return np.maximum(x * np.float32(k), 0)


def test_an_uploaded_model_serves_the_numbers_of_its_module(server: Server) -> None:
    module = models.Scale(3.0)
    with server.admin() as admin:
        loaded = admin.load_model("upload-a", models.scale_archive(3.0))
        assert loaded.version == "1" and loaded.state == "READY" and loaded.source == "upload"
        x = torch.from_numpy(X).requires_grad_(True)
        y = module(x)
        y.retain_grad()
        (y * y).sum().backward()
        assert x.grad is not None and y.grad is not None
        r = admin.analyze(
            "upload-a", X, ["relu"], Objective.grad_outputs(2 * y.detach().numpy()),
            input_grads=True,
        )  # fmt: skip
        np.testing.assert_allclose(r.outputs[0], y.detach().numpy(), rtol=RTOL)
        np.testing.assert_allclose(r.input_grads[0], x.grad.numpy(), rtol=RTOL)
        assert r.metadata["model_version"] == "1" and r.metadata["model_digest"] == loaded.digest
        info = {m.name: m for m in admin.list_models()}["upload-a"]
        assert info.default_version == "1" and info.state == "READY"
        assert [(v.version, v.state, v.source) for v in info.versions] == [("1", "READY", "upload")]
        described = admin.describe("upload-a", version="1")
        assert described.version == "1" and described.digest == loaded.digest
        admin.unload_model("upload-a")


def test_versions_are_picked_by_name_digest_or_default_and_pinned(server: Server) -> None:
    with server.admin() as admin:
        one = admin.load_model("picked", models.scale_archive(1.0))
        two = admin.load_model("picked", models.scale_archive(2.0))
        ten = admin.load_model("picked", models.scale_archive(10.0), version="10")
        assert (one.version, two.version) == ("1", "2")
        assert admin.load_model("picked", models.scale_archive(11.0)).version == "11"

        def run(**pick: str) -> tuple[str, np.ndarray]:
            r = admin.analyze("picked", X, [], Objective.sum(), **pick)
            return r.metadata["model_version"], r.outputs[0]

        version, out = run()  # natural order: "11" after "10" after "2"
        assert version == "11" and np.allclose(out, expected(11))
        version, out = run(version="2")
        assert version == "2" and np.allclose(out, expected(2))
        version, out = run(digest=ten.digest)
        assert version == "10" and np.allclose(out, expected(10))
        with pytest.raises(GradtapError) as e:
            run(version="2", digest=ten.digest)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert e.value.reason == "DIGEST_MISMATCH" and e.value.field == "model.digest"
        with pytest.raises(GradtapError) as e:
            run(version="7")
        assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.reason == "VERSION_NOT_FOUND"

        items = list(admin.analyze_many("picked", [X, 2 * X], [], Objective.sum(), version="2"))
        assert [r.metadata["model_version"] for r in items] == ["2", "2"]
        np.testing.assert_allclose(items[1].outputs[0], expected(2, 2 * X), rtol=RTOL)

        assert admin.set_default_version("picked", "2").default_version == "2"
        assert run()[0] == "2"
        assert admin.set_default_version("picked", None).default_version == "11"
        assert run()[0] == "11"
        admin.unload_model("picked")
        assert "picked" not in {m.name for m in admin.list_models()}
        with pytest.raises(GradtapError) as e:  # a built-in version is code, not an archive
            admin.load_model("seed-mlp", models.scale_archive(1.0), version="1")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert e.value.reason == "VERSION_BUILT_IN"


def test_replacing_the_default_under_16_callers_fails_no_call(server: Server) -> None:
    with server.admin() as admin:
        admin.load_model("rolled", models.scale_archive(1.0), version="1")
    stop = threading.Event()
    swapped_at: list[float] = []
    failures: list[BaseException] = []

    def caller(seed: int) -> list[tuple[float, str, np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(seed)
        seen = []
        with Client(server.address, token=USER, timeout=60) as c:
            while not stop.is_set():
                x = rng.standard_normal((1, 4)).astype(np.float32)
                started = time.monotonic()
                try:
                    r = c.analyze("rolled", x, [], Objective.sum())
                except GradtapError as e:
                    failures.append(e)
                    continue
                seen.append((started, r.metadata["model_version"], x, r.outputs[0]))
        return seen

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(caller, seed) for seed in range(16)]
        time.sleep(0.5)
        with server.admin() as admin:
            admin.load_model("rolled", models.scale_archive(2.0), version="2")
            swapped_at.append(time.monotonic())
        time.sleep(0.5)
        stop.set()
        seen = [call for f in futures for call in f.result()]
    assert failures == []
    versions = {version for _, version, _, _ in seen}
    assert versions == {"1", "2"}
    for started, version, x, out in seen:  # every result has the numbers of its version
        np.testing.assert_allclose(out, expected(float(version), x), rtol=RTOL)
        if started > swapped_at[0]:
            assert version == "2"  # new calls go to the new default once it is READY
    with server.admin() as admin:
        admin.unload_model("rolled")


class Spread(torch.nn.Module):
    """(1, 4096) -> (4096, 4096): a 64 MiB output, which a caller that stops reading holds
    on the server mid-stream."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((4096,), k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).repeat(4096, 1)


def spread_archive(k: float) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(Spread(k), (torch.ones(1, 4096),)), buffer)
    return buffer.getvalue()


def test_unloading_a_version_lets_the_call_running_on_it_finish(server: Server) -> None:
    x = np.random.default_rng(1).standard_normal((1, 4096)).astype(np.float32)
    gc.disable()  # the weights must go by themselves, not with a cycle collection
    with contextlib.ExitStack() as stack, server.admin() as admin:
        stack.callback(gc.enable)
        admin.load_model("draining", spread_archive(2.0), version="1")
        held = server.running.registry.get("draining")
        assert held is not None
        weight = weakref.ref(held.state[0][1])
        del held
        request = calls.analyze("draining", x, [], None).request
        channel = grpc.insecure_channel(server.address)
        stream = pb_grpc.GradientServiceStub(channel).Analyze(
            request, metadata=(("authorization", f"Bearer {USER}"),)
        )
        first = next(stream)  # the call holds version 1 now, and cannot finish unread
        assert first.HasField("header")
        left = admin.unload_model("draining", "1")
        assert left is not None
        assert [(v.version, v.state) for v in left.versions] == [("1", "UNLOADING")]
        with pytest.raises(GradtapError) as refused:  # no new call goes to it
            admin.analyze("draining", x, [], None)
        assert refused.value.reason == "MODEL_NOT_READY"
        rest = list(stream)
        channel.close()
        summary = rest[-1].summary
        assert summary.model_version == "1" and summary.tensor_count == 1
        data = b"".join(c.data for m in [first, *rest] for c in m.chunks)
        np.testing.assert_array_equal(
            np.frombuffer(data, np.float32).reshape(4096, 4096), np.tile(x * 2, (4096, 1))
        )
        assert eventually(lambda: "draining" not in {m.name for m in admin.list_models()})
        assert admin.health("gradtap.v1.model/draining") == "NOT_SERVING"
        # Nothing, the engine's plans included, holds its weights: they go at once.
        assert eventually(lambda: weight() is None)


def test_every_control_call_needs_the_admin_scope(server: Server) -> None:
    archive = models.scale_archive(1.0)
    attempts = {
        "load_model": lambda c: c.load_model("scale", archive),
        "load_model_from_repository": lambda c: c.load_model_from_repository("scale"),
        "unload_model": lambda c: c.unload_model("seed-mlp"),
        "set_default_version": lambda c: c.set_default_version("seed-mlp", "1"),
    }
    for token, code, reason in [
        (USER, grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED"),
        (SCALE_ONLY, grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED"),
        (None, grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN"),
        ("not-a-token", grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN"),
    ]:
        with Client(server.address, token=token, timeout=30) as c:
            for name, attempt in attempts.items():
                with pytest.raises(GradtapError) as e:
                    attempt(c)
                assert (e.value.code, e.value.reason) == (code, reason), (name, token)
    with server.user() as user:
        assert {m.name for m in user.list_models()} >= {"seed-mlp"}  # nothing changed
        assert user.analyze("seed-mlp", np.ones((1, 784), np.float32), []).metadata


def test_control_calls_are_audited_without_the_token(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gradtap.requests")
    with server.admin() as admin:
        admin.load_model("audited", models.scale_archive(1.0), version="4")
        admin.unload_model("audited")
    with server.user() as user, pytest.raises(GradtapError):
        user.unload_model("seed-mlp")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gradtap.requests"]
    audits = [line for line in lines if "audit" in line]
    assert [(a["audit"]["action"], a["code"]) for a in audits] == [
        ("LoadModel", "OK"),
        ("UnloadModel", "OK"),
        ("UnloadModel", "PERMISSION_DENIED"),
    ]
    load = audits[0]["audit"]
    assert load["caller"].startswith("sha256:") and load["token_line"] == 1
    assert load["model"] == "audited" and load["version"] == "4" and load["outcome"] == "READY"
    assert audits[2]["audit"]["token_line"] == 2
    assert all(ADMIN not in r.getMessage() and USER not in r.getMessage() for r in caplog.records)


def test_health_and_metrics_follow_each_model(server: Server) -> None:
    running = server.running
    with server.admin() as admin:
        with pytest.raises(GradtapError):  # an unknown service: gRPC's NOT_FOUND
            admin.health("gradtap.v1.model/watched")
        admin.load_model("watched", models.scale_archive(1.0))
        assert admin.health("gradtap.v1.model/watched") == "SERVING"
        assert admin.health("gradtap.v1.model/seed-mlp") == "SERVING"
        for _ in range(3):
            admin.analyze("watched", X, [], Objective.sum())
        assert metric(running, "gradtap_model_loads_total", model="watched", result="ready") == 1
        assert metric(running, "gradtap_model_version_calls_total", model="watched") == 3
        assert metric(running, "gradtap_model_versions", model="watched", state="READY") == 1
        with pytest.raises(GradtapError):
            admin.load_model("watched", b"PK not really a zip", version="2")
        assert metric(running, "gradtap_model_loads_total", model="watched", result="failed") == 1
        admin.unload_model("watched")
        assert admin.health("gradtap.v1.model/watched") == "NOT_SERVING"
        assert metric(running, "gradtap_model_versions", model="watched") == 0


def test_the_aio_client_has_the_same_control_calls(server: Server) -> None:
    async def main() -> tuple[str, str, str, bool]:
        async with aio.Client(server.address, token=ADMIN, timeout=60) as c:
            loaded = await c.load_model("async-model", models.scale_archive(5.0), version="3")
            r = await c.analyze("async-model", X, [], Objective.sum(), version="3")
            pinned = await c.set_default_version("async-model", "3")
            left = await c.unload_model("async-model")
            return loaded.version, r.metadata["model_version"], pinned.default_version, left is None

    assert asyncio.run(main()) == ("3", "3", "3", True)


def test_model_control_is_off_unless_asked_for(address: str) -> None:
    with Client(address, timeout=30) as c, pytest.raises(GradtapError) as e:
        c.unload_model("seed-mlp")
    assert e.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_model_control_refuses_to_start_without_an_admin_token(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--auth-token-file"):
        start("127.0.0.1:0", Settings(device="cpu", builtins=False, model_control=True))
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{USER}\n")
    with pytest.raises(ValueError, match="@admin"):
        start(
            "127.0.0.1:0",
            Settings(device="cpu", builtins=False, model_control=True, auth_token_file=tokens),
        )
