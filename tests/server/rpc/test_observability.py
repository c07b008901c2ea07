"""Prometheus metrics on the metrics port, x-request-id in trailing metadata, JSON request logs."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from datetime import datetime

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2
from gradtap.server import Settings, start
from gradtap.server.rpc import observability
from gradtap.server.rpc.app import Running
from gradtap.server.rpc.observability import Observability, observe_queue
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

ANALYZE = "gradtap.v1.GradientService/Analyze"
DESCRIBE = "gradtap.v1.GradientService/DescribeModel"
DETAILS_KEY = "grpc-status-details-bin"
X = np.ones((1, 784), np.float32)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    torch.manual_seed(0)
    running = start("127.0.0.1:0", Settings(device="cpu", metrics_port=0))
    yield running
    running.server.stop(None).wait()
    if running.metrics_server is not None:
        running.metrics_server.shutdown()


@pytest.fixture
def stub(running: Running) -> Iterator[pb_grpc.GradientServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield pb_grpc.GradientServiceStub(channel)


def good_request() -> pb.AnalyzeRequest:
    return pb.AnalyzeRequest(
        model=pb.Model(name="seed-mlp"),
        inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=X.shape, data=X.tobytes())],
        targets=[pb.TargetLayer(name="relu_1")],
        objective=pb.Objective(sum=pb.SumObjective()),
    )


def bad_request() -> pb.AnalyzeRequest:
    request = good_request()
    request.model.name = "no-such-model"
    return request


def scrape(running: Running) -> str:
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    return text


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def analyze(
    stub: pb_grpc.GradientServiceStub, request: pb.AnalyzeRequest, request_id: str | None = None
) -> tuple[list[pb.AnalyzeResponse], dict[str, str | bytes]]:
    metadata = () if request_id is None else ((observability.REQUEST_ID_KEY, request_id),)
    call = stub.Analyze(request, timeout=60, metadata=metadata)
    responses = list(call)
    return responses, dict(call.trailing_metadata())


def analyze_failure(
    stub: pb_grpc.GradientServiceStub, request: pb.AnalyzeRequest, request_id: str
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        analyze(stub, request, request_id)
    return info.value


def gradient_bytes(responses: list[pb.AnalyzeResponse]) -> int:
    total = sum(len(c.data) for r in responses for c in r.chunks)
    assert total == responses[0].header.total_bytes
    return total


def test_a_good_and_a_bad_call_move_each_metric_by_exactly_their_share(
    running: Running, stub: pb_grpc.GradientServiceStub
) -> None:
    before = samples(scrape(running))
    responses, _ = analyze(stub, good_request())
    error = analyze_failure(stub, bad_request(), "bad-call")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    after = samples(scrape(running))

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    good = {"rpc": ANALYZE, "model": "seed-mlp"}
    bad = {"rpc": ANALYZE, "model": observability.UNKNOWN_MODEL}
    assert moved("gradtap_requests_total", code="OK", **good) == 1
    assert moved("gradtap_requests_total", code="NOT_FOUND", **bad) == 1
    assert moved("gradtap_requests_total", code="NOT_FOUND", **good) == 0
    sent = moved("gradtap_streamed_bytes_total", **good)
    assert sent == sum(r.ByteSize() for r in responses)
    assert sent >= gradient_bytes(responses) > 0
    assert moved("gradtap_streamed_bytes_total", **bad) == 0
    assert moved("gradtap_request_seconds_count", **good) == 1
    assert moved("gradtap_request_seconds_count", **bad) == 1
    assert moved("gradtap_request_seconds_sum", **good) > 0
    assert moved("gradtap_queue_seconds_count", rpc=ANALYZE) == 2
    assert value(after, "gradtap_in_flight_requests", rpc=ANALYZE) == 0
    # A caller cannot mint label values by naming models that do not exist.
    assert "no-such-model" not in scrape(running)


def test_every_metric_is_exported_and_cuda_gauges_are_absent_on_cpu(running: Running) -> None:
    names = {family.name for family in text_string_to_metric_families(scrape(running))}
    assert {
        "gradtap_requests",
        "gradtap_request_seconds",
        "gradtap_queue_seconds",
        "gradtap_streamed_bytes",
        "gradtap_batch_size",
        "gradtap_in_flight_requests",
    } <= names
    assert all(name.startswith("gradtap_") for name in names)
    if not torch.cuda.is_available():
        assert not any(name.startswith("gradtap_cuda") for name in names)


def test_the_request_id_comes_back_in_trailing_metadata_on_success(
    stub: pb_grpc.GradientServiceStub,
) -> None:
    _, trailing = analyze(stub, good_request(), "abc-123")
    assert trailing[observability.REQUEST_ID_KEY] == "abc-123"
    _, call = stub.DescribeModel.with_call(
        pb.DescribeModelRequest(model=pb.Model(name="seed-mlp")),
        timeout=30,
        metadata=(("x-request-id", "describe.1_A"),),
    )
    assert dict(call.trailing_metadata())["x-request-id"] == "describe.1_A"


def test_an_error_keeps_its_status_details_and_carries_the_request_id(
    stub: pb_grpc.GradientServiceStub,
) -> None:
    streamed = analyze_failure(stub, bad_request(), "abc-123")
    with pytest.raises(grpc.RpcError) as info:
        stub.DescribeModel.with_call(
            pb.DescribeModelRequest(model=pb.Model(name="no-such-model")),
            timeout=30,
            metadata=(("x-request-id", "abc-124"),),
        )
    for error, request_id in ((streamed, "abc-123"), (info.value, "abc-124")):
        trailing = dict(error.trailing_metadata())
        assert trailing["x-request-id"] == request_id
        status = status_pb2.Status.FromString(trailing[DETAILS_KEY])
        assert status.code == grpc.StatusCode.NOT_FOUND.value[0] == error.code().value[0]
        reason = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(reason)
        assert reason.reason == "MODEL_NOT_FOUND"


@pytest.mark.parametrize("hostile", ["", "a b", "x" * 65, "a/b", "id;drop"])
def test_a_request_id_outside_the_pattern_is_replaced_by_a_fresh_one(
    stub: pb_grpc.GradientServiceStub, hostile: str
) -> None:
    _, trailing = analyze(stub, good_request(), hostile)
    replaced = trailing["x-request-id"]
    assert isinstance(replaced, str) and replaced != hostile
    assert len(replaced) == 32 and int(replaced, 16) >= 0


def test_a_call_without_a_request_id_gets_a_fresh_one_per_call(
    stub: pb_grpc.GradientServiceStub,
) -> None:
    ids = {analyze(stub, good_request())[1]["x-request-id"] for _ in range(2)}
    assert len(ids) == 2


def test_each_call_writes_one_json_log_line_with_its_fields(
    stub: pb_grpc.GradientServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gradtap.requests")
    responses, _ = analyze(stub, good_request(), "log-ok")
    analyze_failure(stub, bad_request(), "log-error")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gradtap.requests"]
    ok = [line for line in lines if line["request_id"] == "log-ok"]
    failed = [line for line in lines if line["request_id"] == "log-error"]
    assert len(ok) == len(failed) == 1
    fields = {"ts", "request_id", "rpc", "model", "code", "duration_ms", "bytes_sent", "peer"}
    for line in ok + failed:
        assert fields <= line.keys()
        assert line["rpc"] == ANALYZE
        assert line["duration_ms"] > 0
        assert line["peer"].startswith("ipv4:127.0.0.1:")
        assert datetime.fromisoformat(line["ts"]).utcoffset() is not None
    assert ok[0]["model"] == "seed-mlp" and ok[0]["code"] == "OK"
    assert ok[0]["bytes_sent"] == sum(r.ByteSize() for r in responses)
    assert failed[0]["model"] == "no-such-model" and failed[0]["code"] == "NOT_FOUND"
    assert failed[0]["bytes_sent"] == 0


def echo(
    requests: Iterator[pb.DescribeModelRequest], context: grpc.ServicerContext
) -> Iterator[pb.DescribeModelRequest]:
    """A bidi handler that reports a 0.25 s admission wait, as an admission queue would."""
    observe_queue(0.25)
    yield from requests


def slow(
    request: pb.DescribeModelRequest, context: grpc.ServicerContext
) -> Iterator[pb.DescribeModelRequest]:
    """A stream that outlasts any short deadline."""
    for _ in range(200):
        time.sleep(0.01)
        yield request


@contextlib.contextmanager
def bare_server(interceptor: Observability) -> Iterator[grpc.Channel]:
    """A bare server with the interceptor and the echo and slow handlers, and a channel to it."""
    message = pb.DescribeModelRequest
    codec = {
        "request_deserializer": message.FromString,
        "response_serializer": message.SerializeToString,
    }
    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Echo": grpc.stream_stream_rpc_method_handler(echo, **codec),
            "Slow": grpc.unary_stream_rpc_method_handler(slow, **codec),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[interceptor])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        server.stop(None).wait()


def test_a_bidi_call_is_counted_and_waits_reported_by_observe_queue_add_to_queue_time() -> None:
    interceptor = Observability(CollectorRegistry())
    messages = [pb.DescribeModelRequest(model=pb.Model(name=f"m{i}")) for i in range(3)]
    with bare_server(interceptor) as channel:
        call = channel.stream_stream(
            "/test.Echo/Echo",
            request_serializer=pb.DescribeModelRequest.SerializeToString,
            response_deserializer=pb.DescribeModelRequest.FromString,
        )
        assert list(call(iter(messages), timeout=30)) == messages
    found = samples(generate_latest(interceptor.registry).decode())
    labels = {"rpc": "test.Echo/Echo", "model": "m0"}
    assert value(found, "gradtap_requests_total", code="OK", **labels) == 1
    assert value(found, "gradtap_streamed_bytes_total", **labels) == sum(
        m.ByteSize() for m in messages
    )
    assert value(found, "gradtap_queue_seconds_count", rpc="test.Echo/Echo") == 1
    assert value(found, "gradtap_queue_seconds_sum", rpc="test.Echo/Echo") >= 0.25
    assert value(found, "gradtap_in_flight_requests", rpc="test.Echo/Echo") == 0


def test_a_stream_cut_by_its_deadline_is_counted_deadline_exceeded_and_leaves_flight() -> None:
    interceptor = Observability(CollectorRegistry())
    with bare_server(interceptor) as channel:
        call = channel.unary_stream(
            "/test.Echo/Slow",
            request_serializer=pb.DescribeModelRequest.SerializeToString,
            response_deserializer=pb.DescribeModelRequest.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call(pb.DescribeModelRequest(model=pb.Model(name="m")), timeout=0.2))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        rpc = {"rpc": "test.Echo/Slow"}
        for _ in range(100):  # the server notices a moment after the client gives up
            found = samples(generate_latest(interceptor.registry).decode())
            if value(found, "gradtap_requests_total", code="DEADLINE_EXCEEDED", model="m", **rpc):
                break
            time.sleep(0.05)
    assert value(found, "gradtap_requests_total", code="DEADLINE_EXCEEDED", model="m", **rpc) == 1
    assert value(found, "gradtap_in_flight_requests", **rpc) == 0
    every_message = 200 * pb.DescribeModelRequest(model=pb.Model(name="m")).ByteSize()
    assert 0 < value(found, "gradtap_streamed_bytes_total", model="m", **rpc) < every_message


def test_observe_batch_fills_the_batch_size_histogram() -> None:
    interceptor = Observability(CollectorRegistry())
    for size in (1, 3, 8):
        interceptor.observe_batch(size)
    found = samples(generate_latest(interceptor.registry).decode())
    assert value(found, "gradtap_batch_size_count") == 3
    assert value(found, "gradtap_batch_size_sum") == 12
    assert value(found, "gradtap_batch_size_bucket", le="2.0") == 1


def test_cuda_memory_gauges_read_torch_at_scrape_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    allocated = {0: 100, 1: 200}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: allocated[i])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 1000 + allocated[i])
    interceptor = Observability(CollectorRegistry())
    allocated[1] = 250
    found = samples(generate_latest(interceptor.registry).decode())
    assert value(found, "gradtap_cuda_memory_allocated_bytes", device="cuda:0") == 100
    assert value(found, "gradtap_cuda_memory_allocated_bytes", device="cuda:1") == 250
    assert value(found, "gradtap_cuda_memory_reserved_bytes", device="cuda:1") == 1250
