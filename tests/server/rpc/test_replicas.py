"""Scale-out: one client, three replicas behind one gRPC target, round-robin, one killed -9."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
from gradtap.client import Client, GradtapError, Objective, Result

from ...serving import ServerProcess, servers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[ServerProcess]]:
    # Started together: each spends most of its start-up exporting the built-in models.
    with servers([["--device", "cpu"]] * 3) as started:
        yield started


def target(replicas: list[ServerProcess]) -> str:
    return "ipv4:" + ",".join(r.address for r in replicas)


def inputs(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 784)).astype(np.float32)


def analyze(client: Client, seed: int) -> Result:
    return client.analyze(
        "seed-mlp", inputs(seed), ["relu_1"], Objective.logit(3), input_grads=True, timeout=30
    )


def test_calls_spread_over_the_replicas_and_agree_bitwise(replicas: list[ServerProcess]) -> None:
    with Client(target(replicas), timeout=30) as client:
        results = [analyze(client, seed=7) for _ in range(12)]
    pids = {str(r.pid) for r in replicas}
    answered = {r.metadata["replica"] for r in results}
    assert {name.rsplit(":", 1)[1] for name in answered} <= pids
    assert len(answered) >= 2, answered
    first = results[0]
    for r in results[1:]:
        np.testing.assert_array_equal(r.gradients["relu_1"], first.gradients["relu_1"])
        np.testing.assert_array_equal(r.input_grads[0], first.input_grads[0])
        assert r.loss == first.loss


def test_killing_a_replica_loses_no_call(replicas: list[ServerProcess]) -> None:
    victim = replicas[0]
    failures: list[GradtapError] = []
    answered: list[str] = []
    done = threading.Event()

    def steady_calls() -> None:
        with Client(target(replicas), timeout=30) as client:
            k = 0
            while not done.is_set() or k < 40:
                try:
                    answered.append(analyze(client, seed=k).metadata["replica"])
                except GradtapError as e:
                    failures.append(e)
                k += 1

    callers = [threading.Thread(target=steady_calls) for _ in range(2)]
    for t in callers:
        t.start()
    while len(answered) < 20 and not failures and all(t.is_alive() for t in callers):
        threading.Event().wait(0.01)
    victim.kill()
    killed_at = len(answered)
    done.set()
    for t in callers:
        t.join(120)
    assert not failures, failures
    after = answered[killed_at + 4 :]  # calls already in flight may have been answered by it
    assert after and all(not name.endswith(f":{victim.pid}") for name in after)
    assert len({name for name in after}) == 2
