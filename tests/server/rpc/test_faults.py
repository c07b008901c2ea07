"""Faults: a server killed mid-stream, callers that go away, deadlines, SIGTERM, overload."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradtap.client._calls as client_module
import grpc
import numpy as np
import pytest
import torch
from gradtap.client import Client, GradtapError, Objective, Result
from gradtap.server import Settings, start
from gradtap.server.models.zoo import export_builtin
from gradtap.server.rpc.app import Running

from ...serving import big_result_repository, eventually, metric, servers

CONVNET = "convnet"
ANALYZE = "gradtap.v1.GradientService/Analyze"


def images(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 28, 28)).astype(np.float32)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`convnet` (seed-convnet: slow at large batches) and `big` (a 64 MiB result)."""
    directory = tmp_path_factory.mktemp("faults")
    torch.export.save(export_builtin("seed-convnet"), directory / f"{CONVNET}.pt2")
    return big_result_repository(directory)


@pytest.fixture(scope="module")
def limited(repository: Path) -> Iterator[Running]:
    """A server with room for 2 running and 2 waiting calls."""
    settings = Settings(
        device="cpu",
        builtins=False,
        model_repository=repository,
        max_concurrent_requests=2,
        max_queue=2,
        metrics_port=0,
    )
    running = start("127.0.0.1:0", settings)
    yield running
    running.drain(0)


def address(running: Running) -> str:
    return f"127.0.0.1:{running.port}"


def in_flight(running: Running) -> float:
    return metric(running, "gradtap_in_flight_requests", rpc=ANALYZE)


class Hooked(client_module.AnalysisAssembler):  # type: ignore[misc, name-defined]
    """The client's AnalysisAssembler, calling `on_message(count)` before it takes each message."""

    on_message: Callable[[int], None] = staticmethod(lambda count: None)
    fed = 0

    def feed(self, message: Any) -> None:
        Hooked.fed += 1
        Hooked.on_message(Hooked.fed)
        super().feed(message)


@pytest.fixture
def hooked(monkeypatch: pytest.MonkeyPatch) -> type[Hooked]:
    Hooked.fed = 0
    monkeypatch.setattr(client_module, "AnalysisAssembler", Hooked)
    return Hooked


def test_a_server_killed_mid_stream_raises_and_returns_no_partial_result(
    repository: Path, hooked: type[Hooked], tmp_path: Path
) -> None:
    only_big = big_result_repository(tmp_path)
    with servers([["--device", "cpu", "--no-builtins", "--model-repository", str(only_big)]]) as (
        server,
    ):

        def kill_on_first(count: int) -> None:
            if count == 1:
                server.kill()

        hooked.on_message = staticmethod(kill_on_first)
        x = np.ones((1, 4096), np.float32)
        with Client(server.address, timeout=60) as client, pytest.raises(GradtapError) as failed:
            client.analyze("big", x)
    assert failed.value.code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    ), failed.value
    assert 1 <= hooked.fed < 64  # the stream broke off: 64 MiB come in 64 messages


def test_a_client_cancelling_mid_stream_leaves_the_server_serving(
    limited: Running, hooked: type[Hooked]
) -> None:
    x = np.ones((1, 4096), np.float32)
    client = Client(address(limited), timeout=60)

    def close_on_second(count: int) -> None:
        if count == 2:
            client.close()  # cancels the call being read

    hooked.on_message = staticmethod(close_on_second)
    with pytest.raises(GradtapError) as failed:
        client.analyze("big", x)
    assert failed.value.code == grpc.StatusCode.CANCELLED
    hooked.on_message = staticmethod(lambda count: None)
    # The server let go of the call and its place, and serves the next ones in full.
    assert eventually(lambda: in_flight(limited) == 0)
    with Client(address(limited), timeout=60) as again:
        assert again.health() == "SERVING"
        result = again.analyze("big", x)
    assert result.outputs[0].shape == (4096, 4096)
    np.testing.assert_array_equal(result.outputs[0], np.ones((4096, 4096), np.float32))


def test_a_passed_deadline_is_deadline_exceeded(limited: Running) -> None:
    with Client(address(limited), timeout=0.05) as client:
        with pytest.raises(GradtapError) as failed:
            client.analyze(CONVNET, images(1024), ["relu_1"], Objective.sum(), input_grads=True)
        assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert client.health(timeout=10) == "SERVING"
    assert eventually(lambda: in_flight(limited) == 0)


def test_a_call_without_deadline_ends_at_the_servers_maximum_duration(repository: Path) -> None:
    settings = Settings(
        device="cpu", builtins=False, model_repository=repository, max_call_seconds=0.2
    )
    running = start("127.0.0.1:0", settings)
    try:
        with Client(address(running)) as client:  # no deadline at all
            started = time.monotonic()
            with pytest.raises(GradtapError) as failed:
                client.analyze(CONVNET, images(1024), ["relu_1"], Objective.sum(), input_grads=True)
            took = time.monotonic() - started
            assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert failed.value.reason == "CALL_TOO_LONG"
            assert "--max-call-seconds" in failed.value.message
            # Quick calls still fit, and the server carries on.
            small = client.analyze(CONVNET, images(1), ["relu_1"], Objective.sum())
        assert np.isfinite(small.loss)
        assert took < 30
    finally:
        running.drain(0)


def test_sigterm_drains_in_flight_calls_refuses_new_ones_and_exits_0() -> None:
    x = images(256, seed=3)

    def analyze(client: Client) -> Result:
        return client.analyze(
            "seed-convnet", x, ["relu_1"], Objective.sum(), input_grads=True, outputs=False
        )

    with servers([["--device", "cpu", "--grace", "60"]]) as (server,):
        with Client(server.address, timeout=120) as client:
            started = time.monotonic()
            expected = analyze(client)
            alone = time.monotonic() - started
            outcome: dict[str, Any] = {}

            def in_flight_call() -> None:
                try:
                    outcome["result"] = analyze(client)
                except BaseException as e:  # noqa: BLE001 - checked below
                    outcome["error"] = e

            caller = threading.Thread(target=in_flight_call)
            caller.start()
            time.sleep(alone / 4)  # the call is on the server, far from done
            assert caller.is_alive()
            server.terminate()

            probes: list[str] = []

            def draining() -> bool:
                with Client(server.address, retries=0) as probe:
                    try:
                        probes.append(probe.health(timeout=1))
                    except GradtapError as e:
                        probes.append(e.code.name)  # UNAVAILABLE: the port is closed
                return probes[-1] in ("NOT_SERVING", "UNAVAILABLE")

            assert eventually(draining, 15), probes
            with Client(server.address, retries=0) as late, pytest.raises(GradtapError) as refused:
                late.analyze("seed-convnet", images(1), ["relu_1"], Objective.sum())
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            caller.join(120)
        assert server.wait(60) == 0, server.log()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    for name in ("relu_1",):
        np.testing.assert_array_equal(result.gradients[name], expected.gradients[name])
    np.testing.assert_array_equal(result.input_grads[0], expected.input_grads[0])


def test_overload_at_twice_capacity_refuses_some_with_retry_info_and_serves_the_rest(
    limited: Running,
) -> None:
    capacity = 2 + 2  # running + waiting
    x = images(256, seed=5)
    with Client(address(limited), timeout=120, retries=0) as client:
        expected = client.analyze(CONVNET, x, ["relu_1"], Objective.sum())
        outcomes: list[Result | GradtapError | BaseException] = [RuntimeError("not run")] * (
            2 * capacity
        )
        barrier = threading.Barrier(len(outcomes))

        def call(i: int) -> None:
            barrier.wait()
            try:
                outcomes[i] = client.analyze(CONVNET, x, ["relu_1"], Objective.sum())
            except BaseException as e:  # noqa: BLE001 - checked below
                outcomes[i] = e

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(outcomes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        refused = [o for o in outcomes if isinstance(o, GradtapError)]
        served = [o for o in outcomes if isinstance(o, Result)]
        assert len(refused) + len(served) == len(outcomes), outcomes
        assert refused and len(served) >= capacity, outcomes
        for e in refused:
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert e.reason == "SERVER_OVERLOADED"
            assert e.details.retry_delay is not None and 0 < e.details.retry_delay <= 10
        for r in served:
            np.testing.assert_array_equal(r.gradients["relu_1"], expected.gradients["relu_1"])
        assert client.health() == "SERVING"
        again = client.analyze(CONVNET, x, ["relu_1"], Objective.sum())
        np.testing.assert_array_equal(again.gradients["relu_1"], expected.gradients["relu_1"])
