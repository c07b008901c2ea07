"""The client's retry policy, against a scripted server: what is retried, how often, how late."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from gradtap.client import Client, GradtapError, aio
from gradtap.client._channel import channel_options
from gradtap.client._retry import method_config
from gradtap.server.errors import InvalidArgument, RequestError, ResourceExhausted
from gradtap.server.rpc.admission import Admission, overloaded_status
from gradtap.server.rpc.status import status_for

from gradtap.v1 import gradtap_pb2 as pb

ANALYZE = "/gradtap.v1.GradientService/Analyze"

Script = Callable[[int, grpc.ServicerContext], None]
"""Called with the attempt number (1, 2, ...); aborts the call to fail that attempt."""


class Scripted:
    """A GradientService whose Analyze follows a script, then answers an empty result in two
    messages: a header, then the summary; `midway` runs between them."""

    def __init__(self) -> None:
        self.script: Script = lambda attempt, context: None
        self.midway: Script = lambda attempt, context: None
        self.arrivals: list[float] = []

    def analyze(self, request: pb.AnalyzeRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        self.arrivals.append(time.monotonic())
        self.script(len(self.arrivals), context)
        yield pb.AnalyzeResponse(header=pb.AnalyzeHeader())
        self.midway(len(self.arrivals), context)
        yield pb.AnalyzeResponse(summary=pb.AnalyzeSummary(tensor_count=0, loss=1.0))


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[Scripted, str]]:
    service = Scripted()
    handler = grpc.unary_stream_rpc_method_handler(
        service.analyze,
        request_deserializer=pb.AnalyzeRequest.FromString,
        response_serializer=pb.AnalyzeResponse.SerializeToString,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(4),
        # The real admission interceptor: it marks RESOURCE_EXHAUSTED that is no overload.
        interceptors=[Admission(4, 4, 60.0)],
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("gradtap.v1.GradientService", {"Analyze": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(None).wait()


@pytest.fixture
def server(scripted: tuple[Scripted, str]) -> tuple[Scripted, str]:
    service, address = scripted
    service.arrivals.clear()
    service.script = service.midway = lambda attempt, context: None
    return service, address


def fail(error: RequestError) -> Callable[[grpc.ServicerContext], None]:
    def abort(context: grpc.ServicerContext) -> None:
        context.abort_with_status(status_for(error))

    return abort


def call(address: str, **client: Any) -> float:
    with Client(address, timeout=30, **client) as c:
        return c.analyze("m", np.zeros((1, 2), np.float32), outputs=False).loss


def test_an_overloaded_server_is_retried_after_its_pushback_and_the_call_succeeds(
    server: tuple[Scripted, str],
) -> None:
    service, address = server

    def overloaded_twice(attempt: int, context: grpc.ServicerContext) -> None:
        if attempt <= 2:
            context.abort_with_status(overloaded_status(0.4, 1, 0))

    service.script = overloaded_twice
    assert call(address) == 1.0
    assert len(service.arrivals) == 3
    gaps = np.diff(service.arrivals)
    # Backoff alone would wait at most 0.1 s, then 0.2 s: these waits are the pushback's.
    assert all(gap >= 0.38 for gap in gaps), gaps


@pytest.mark.parametrize(("retries", "attempts"), [(0, 1), (1, 2), (3, 4), (4, 5)])
def test_retries_are_capped(server: tuple[Scripted, str], retries: int, attempts: int) -> None:
    service, address = server
    service.script = lambda attempt, context: context.abort_with_status(
        overloaded_status(0.01, 1, 0)
    )
    with pytest.raises(GradtapError) as refused:
        call(address, retries=retries)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == "SERVER_OVERLOADED"
    assert refused.value.details.retry_delay == pytest.approx(0.01)
    assert len(service.arrivals) == attempts


def test_unavailable_is_retried(server: tuple[Scripted, str]) -> None:
    service, address = server

    def unavailable_once(attempt: int, context: grpc.ServicerContext) -> None:
        if attempt == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    service.script = unavailable_once
    assert call(address) == 1.0
    assert len(service.arrivals) == 2


@pytest.mark.parametrize(
    "error",
    [
        InvalidArgument("bad", reason="UNKNOWN_TARGET", field="targets[0].name"),
        # Too large stays too large: the server says so with a negative pushback.
        ResourceExhausted("too many elements", reason="TENSOR_TOO_LARGE", field="inputs[0]"),
    ],
    ids=lambda e: e.reason,
)
def test_errors_that_would_fail_again_are_not_retried(
    server: tuple[Scripted, str], error: RequestError
) -> None:
    service, address = server
    service.script = lambda attempt, context: fail(error)(context)
    with pytest.raises(GradtapError) as failed:
        call(address)
    assert failed.value.reason == error.reason
    assert len(service.arrivals) == 1


def test_the_service_config_retries_only_gradient_service_calls() -> None:
    options = dict(channel_options(retries=3))
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "gradtap.v1.GradientService"}]
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert options["grpc.enable_retries"] == 1
    assert "methodConfig" not in json.loads(dict(channel_options(retries=0))["grpc.service_config"])


@pytest.mark.parametrize("retries", [-1, 5, True, 1.5])
def test_retries_outside_0_to_4_are_refused(retries: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        method_config(retries)
    with pytest.raises((ValueError, TypeError)):
        Client("127.0.0.1:1", retries=retries)


def cut_midway(attempt: int, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")


def test_a_stream_cut_off_as_unavailable_is_sent_once_more(server: tuple[Scripted, str]) -> None:
    # gRPC's policy cannot retry once a response arrived: the client sends the call again.
    service, address = server
    service.midway = lambda attempt, context: cut_midway(attempt, context) if attempt == 1 else None
    assert call(address) == 1.0
    assert len(service.arrivals) == 2


@pytest.mark.parametrize(("retries", "attempts"), [(0, 1), (3, 2)])
def test_a_stream_cut_off_is_sent_again_at_most_once(
    server: tuple[Scripted, str], retries: int, attempts: int
) -> None:
    service, address = server
    service.midway = cut_midway
    with pytest.raises(GradtapError) as failed:
        call(address, retries=retries)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(service.arrivals) == attempts


def test_a_stream_cut_off_otherwise_is_not_sent_again(server: tuple[Scripted, str]) -> None:
    service, address = server
    service.midway = lambda attempt, context: context.abort(grpc.StatusCode.INTERNAL, "bug")
    with pytest.raises(GradtapError) as failed:
        call(address)
    assert failed.value.code == grpc.StatusCode.INTERNAL
    assert len(service.arrivals) == 1


def test_the_asyncio_client_retries_and_sends_a_cut_off_stream_again(
    server: tuple[Scripted, str],
) -> None:
    service, address = server

    def overloaded_once(attempt: int, context: grpc.ServicerContext) -> None:
        if attempt == 1:
            context.abort_with_status(overloaded_status(0.01, 1, 0))

    service.script = overloaded_once
    service.midway = lambda attempt, context: cut_midway(attempt, context) if attempt == 2 else None

    async def main() -> float:
        async with aio.Client(address, timeout=30) as client:
            result = await client.analyze("m", np.zeros((1, 2), np.float32), outputs=False)
        return result.loss

    assert asyncio.run(main()) == 1.0
    assert len(service.arrivals) == 3  # refused, cut off, answered
