"""Every call is bounded in time wherever it is: in Captum, and blocked sending to a client
that reads nothing (a stalled reader loses its place, and its memory goes back)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from gradtap.client import Client, GradtapError, Objective
from gradtap.client._errors import from_rpc_error
from gradtap.server import Settings, start

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

from ...serving import ServerProcess, eventually, servers

STALL_SECONDS = 1.0
PLACES = 2
ROWS = 256
"""seed-convnet at this batch, gradient and activation of relu_1 and the input gradient:
about 15 MiB of results, more than gRPC buffers for a stream nobody reads (about 5 MiB)."""


def images(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 28, 28)).astype(np.float32)


def big_request(rows: int = ROWS) -> pb.AnalyzeRequest:
    x = images(rows)
    return pb.AnalyzeRequest(
        model=pb.Model(name="seed-convnet"),
        inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(x.shape), data=x.tobytes())],
        targets=[pb.TargetLayer(name="relu_1", capture=pb.CAPTURE_GRADIENT_AND_ACTIVATION)],
        objective=pb.Objective(sum=pb.SumObjective()),
        input_grads=True,
    )


def rss(pid: int) -> int:
    """A process's resident set now, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1]) << 10


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    flags = [
        "--device=cpu",
        f"--stall-seconds={STALL_SECONDS}",
        f"--max-concurrent-requests={PLACES}",
        "--max-queue=2",
        "--max-batch-size=1",
    ]
    with servers([flags]) as (process,):
        yield process


def normal_call(address: str) -> np.ndarray:
    """A caller that reads: served despite the stalled ones. Until the first stall bound has
    passed, the queue may be full of them: it comes back after the delay the server asks."""
    with Client(address, timeout=120, retries=0) as client:
        for _ in range(100):
            try:
                r = client.analyze("seed-convnet", images(4, seed=1), ["relu_1"], Objective.sum())
                return r.gradients["relu_1"]
            except GradtapError as e:
                if e.reason != "SERVER_OVERLOADED" or e.details.retry_delay is None:
                    raise
                time.sleep(e.details.retry_delay)
    raise AssertionError("refused 100 times")


def _drain(stream: object) -> grpc.RpcError | None:
    try:
        for _ in stream:  # type: ignore[attr-defined]
            pass
    except grpc.RpcError as e:
        return e
    return None


def test_a_stalled_reader_loses_its_place_and_the_next_caller_is_served(
    server: ServerProcess,
) -> None:
    expected = normal_call(server.address)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        stalled = [stub.Analyze(big_request()) for _ in range(PLACES)]
        for stream in stalled:
            next(stream)  # the header came; the rest is never read
        # Both places are held by readers that read nothing: the next caller is served
        # once the stall bound takes one away.
        np.testing.assert_array_equal(normal_call(server.address), expected)
        # A stream read from now on may finish; at least one was cut to serve that call.
        errors = [e for e in (_drain(stream) for stream in stalled) if e is not None]
    assert errors
    for error in errors:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "READER_STALLED" in error.details() and "--stall-seconds" in error.details()
    # the client reads the reason from the message: no status details fit behind unread data
    assert from_rpc_error(errors[0]).reason == "READER_STALLED"


def test_unread_streams_on_one_channel_do_not_lock_others_out_and_memory_returns(
    server: ServerProcess,
) -> None:
    expected = normal_call(server.address)
    with grpc.insecure_channel(server.address) as channel:  # a first round: allocator warm
        streams = [pb_grpc.GradientServiceStub(channel).Analyze(big_request()) for _ in range(8)]
        normal_call(server.address)
        for stream in streams:
            _drain(stream)
    before = rss(server.pid)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        streams = [stub.Analyze(big_request()) for _ in range(200)]  # none is ever read
        for _ in range(3):
            np.testing.assert_array_equal(normal_call(server.address), expected)
        outcomes = [_drain(stream) for stream in streams]
    # Refused (the queue was full), cut (stalled), or run to the end once read here.
    reasons = Counter(
        "READER_STALLED" if "READER_STALLED" in e.details() else e.code().name
        for e in outcomes
        if e is not None
    )
    assert reasons["READER_STALLED"] >= 1 and set(reasons) <= {
        "READER_STALLED",
        "RESOURCE_EXHAUSTED",
    }, reasons
    assert eventually(lambda: rss(server.pid) <= 1.1 * before, seconds=30), (
        f"server RSS {rss(server.pid) >> 20} MiB, {before >> 20} MiB before"
    )
    np.testing.assert_array_equal(normal_call(server.address), expected)


def test_integrated_gradients_stop_at_the_servers_maximum_duration_without_a_deadline() -> None:
    running = start("127.0.0.1:0", Settings(device="cpu", max_call_seconds=3.0, max_batch_size=1))
    try:
        with Client(f"127.0.0.1:{running.port}", retries=0) as client:  # no deadline
            with pytest.raises(GradtapError) as caught:
                client.attribute(
                    "seed-convnet",
                    images(64),
                    "integrated_gradients",
                    index=0,
                    n_steps=4096,  # minutes of work on two cores
                    internal_batch_size=256,
                )
            assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert caught.value.reason == "CALL_TOO_LONG"  # the server's limit, not a deadline
            assert running.compute is not None
            # the compute thread is free again: the next call is served
            r = client.analyze(
                "seed-mlp", np.zeros((1, 784), np.float32), ["relu"], Objective.sum()
            )
            assert r.gradients["relu"].shape[0] == 1
    finally:
        running.server.stop(None).wait()
