"""Admission control: a bounded queue in front of the expensive calls, refusals with pushback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2
from gradtap.client import Client, GradtapError, Objective, Result, Target
from gradtap.server import Settings, start
from gradtap.server.models.zoo import export_builtin
from gradtap.server.rpc.admission import PUSHBACK_KEY, Admission, limited
from gradtap.server.rpc.app import Running

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

from ...serving import eventually, metric

ANALYZE = "gradtap.v1.GradientService/Analyze"
SLOW_ROWS = 2048
"""seed-convnet at this batch keeps a place for most of a second (0.2 s per 512 rows on a
2-core machine); the target is summed per row, so the time goes to computing, not sending."""


def images(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 28, 28)).astype(np.float32)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("admission")
    torch.export.save(export_builtin("seed-convnet"), directory / "convnet.pt2")
    return directory


def serve(repository: Path, **settings: float) -> Running:
    return start(
        "127.0.0.1:0",
        Settings(
            device="cpu",
            builtins=False,
            model_repository=repository,
            metrics_port=0,
            **settings,  # type: ignore[arg-type]
        ),
    )


@pytest.fixture(scope="module")
def one_place(repository: Path) -> Iterator[Running]:
    """One call runs at a time; none may wait."""
    running = serve(repository, max_concurrent_requests=1, max_queue=0)
    yield running
    running.drain(0)


@pytest.fixture(scope="module")
def one_waiting(repository: Path) -> Iterator[Running]:
    """One call runs at a time; one may wait."""
    running = serve(repository, max_concurrent_requests=1, max_queue=1)
    yield running
    running.drain(0)


def address(running: Running) -> str:
    return f"127.0.0.1:{running.port}"


def analyze(client: Client, rows: int, **kwargs: float) -> Result:
    return client.analyze("convnet", images(rows), ["relu_1"], Objective.sum(), **kwargs)


def slow(client: Client) -> Result:
    """A call that holds its place long (see SLOW_ROWS)."""
    target = Target("relu_1", reduce="sum")
    return client.analyze("convnet", images(SLOW_ROWS), [target], Objective.sum())


class Occupied:
    """Runs slow calls in the background; `__enter__` returns once all of them are in."""

    def __init__(self, running: Running, calls: int = 1) -> None:
        self.running = running
        self.calls = calls
        self.outcomes: list[Result | BaseException] = []
        self.threads: list[threading.Thread] = []
        self.before = 0.0

    def _call(self) -> None:
        try:
            with Client(address(self.running), timeout=120, retries=0) as client:
                self.outcomes.append(slow(client))
        except BaseException as e:  # noqa: BLE001 - checked by the test
            self.outcomes.append(e)

    def __enter__(self) -> Occupied:
        self.before = metric(self.running, "gradtap_in_flight_requests", rpc=ANALYZE)
        admission = self.running.admission
        assert admission is not None
        for k in range(self.calls):
            thread = threading.Thread(target=self._call)
            thread.start()
            self.threads.append(thread)
            target = self.before + k + 1
            # In flight is counted before admission: wait until the call holds a place too,
            # or a test's own call could take that place first.
            assert eventually(
                lambda t=target, k=k: (
                    metric(self.running, "gradtap_in_flight_requests", rpc=ANALYZE) >= t
                    and admission.running >= min(k + 1, admission.max_concurrent)
                )
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for thread in self.threads:
            thread.join(120)

    def results(self) -> list[Result]:
        assert all(isinstance(o, Result) for o in self.outcomes), self.outcomes
        return [o for o in self.outcomes if isinstance(o, Result)]


def test_only_gradient_service_work_goes_through_admission() -> None:
    for method in ("Analyze", "AnalyzeMany", "Attribute", "Perturb"):
        assert limited(f"/gradtap.v1.GradientService/{method}")
    for method in ("ListModels", "DescribeModel"):
        assert not limited(f"/gradtap.v1.GradientService/{method}")
    assert not limited("/grpc.health.v1.Health/Check")
    assert not limited("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")


def test_a_call_that_cannot_queue_is_refused_at_once_with_retry_info_and_pushback(
    one_place: Running,
) -> None:
    request = pb.AnalyzeRequest(
        model=pb.Model(name="convnet"),
        inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 3, 28, 28], data=bytes(4 * 2352))],
        outputs=True,
    )
    with Occupied(one_place), grpc.insecure_channel(address(one_place)) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Analyze(request, timeout=30))
        took = time.monotonic() - started
    error = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert took < 0.5  # no waiting
    trailing = dict(error.trailing_metadata())
    pushback_ms = int(trailing[PUSHBACK_KEY])
    assert 100 <= pushback_ms <= 10_000
    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(retry)
    assert info.reason == "SERVER_OVERLOADED" and info.domain == "gradtap.v1"
    assert info.metadata["max_concurrent_requests"] == "1"
    assert retry.retry_delay.ToMilliseconds() == pushback_ms


def test_health_listing_and_describing_are_never_limited(one_place: Running) -> None:
    with Occupied(one_place), Client(address(one_place), timeout=10, retries=0) as client:
        assert client.health() == "SERVING"
        assert [m.name for m in client.list_models()] == ["convnet"]
        assert client.describe("convnet").inputs[0].shape[1:] == (3, 28, 28)


def test_a_queued_call_waits_for_a_place_and_completes(one_waiting: Running) -> None:
    queued_before = metric(one_waiting, "gradtap_queue_seconds_sum", rpc=ANALYZE)
    with Occupied(one_waiting) as running:
        with Client(address(one_waiting), timeout=120, retries=0) as client:
            queued = analyze(client, 2)
    assert running.results()
    with Client(address(one_waiting), timeout=60) as client:
        alone = analyze(client, 2)
    np.testing.assert_array_equal(queued.gradients["relu_1"], alone.gradients["relu_1"])
    # The wait for the running call to finish is reported as queue time.
    queued_seconds = metric(one_waiting, "gradtap_queue_seconds_sum", rpc=ANALYZE)
    assert queued_seconds - queued_before > 0.1


def test_a_queued_call_honours_its_deadline_and_frees_its_place(one_waiting: Running) -> None:
    with Occupied(one_waiting):
        with Client(address(one_waiting), retries=0) as client:
            with pytest.raises(GradtapError) as expired:
                analyze(client, 1, timeout=0.3)
            assert expired.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            # The expired call left the queue: the next one may wait in its place.
            assert analyze(client, 1, timeout=120).gradients["relu_1"].shape[0] == 1


def test_running_and_queued_calls_end_at_the_servers_maximum_duration(repository: Path) -> None:
    running = serve(repository, max_concurrent_requests=1, max_queue=1, max_call_seconds=0.3)
    try:
        # Both calls take about a second alone; neither sets a deadline.
        occupied = Occupied(running)
        with occupied, Client(address(running), retries=0) as client:
            with pytest.raises(GradtapError) as too_long:
                slow(client)
        assert too_long.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert too_long.value.reason == "CALL_TOO_LONG"
        (first,) = occupied.outcomes
        assert isinstance(first, GradtapError) and first.reason == "CALL_TOO_LONG"
        assert eventually(lambda: metric(running, "gradtap_in_flight_requests") == 0)
    finally:
        running.drain(0)


def test_a_refused_call_is_retried_after_the_pushback_and_succeeds_once_a_place_frees(
    one_place: Running,
) -> None:
    refused_before = metric(
        one_place, "gradtap_requests_total", rpc=ANALYZE, code="RESOURCE_EXHAUSTED"
    )
    with Occupied(one_place) as occupied, Client(address(one_place), timeout=120) as client:
        result = analyze(client, 1)  # retries=3, the default
    assert result.gradients["relu_1"].shape[0] == 1
    assert occupied.results()
    refused = metric(one_place, "gradtap_requests_total", rpc=ANALYZE, code="RESOURCE_EXHAUSTED")
    assert refused > refused_before  # the first attempt was refused, a retry got through


def test_admission_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_concurrent_requests"):
        Admission(0, 1, 1.0)
    with pytest.raises(ValueError, match="max_queue"):
        Admission(1, -1, 1.0)
    with pytest.raises(ValueError, match="max_call_seconds"):
        Admission(1, 1, 0.0)
