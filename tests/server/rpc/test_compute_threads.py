"""A server computes on its compute threads only, whichever thread serves the call.

torch's OpenMP runtime keeps a team of threads per thread that runs a parallel operator; a
server that computed on its many serving threads grew many teams, and libgomp then made
every team's threads sleep between operators (engine/compute.py). Every gradient a served
call computes goes through torch.autograd.grad, which records here the thread it runs on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from gradtap.client import Client, Objective

from ...conftest import Served


@pytest.fixture
def grad_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    names: list[str] = []
    grad = torch.autograd.grad

    def recording(*args: Any, **kwargs: Any) -> Any:
        names.append(threading.current_thread().name)
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recording)
    return names


def test_every_served_computation_runs_on_the_compute_thread(
    served: Served, grad_threads: list[str]
) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    calls: list[Callable[[Client], object]] = [
        lambda c: c.analyze("seed-convnet", x, ["relu_1"], Objective.sum(), input_grads=True),
        lambda c: c.analyze("seed-convnet", x[:1], ["conv2"], Objective.sum()),
        lambda c: c.attribute("seed-convnet", x, "saliency", index=3),
        lambda c: c.perturb(
            "seed-convnet",
            x,
            "pgd",
            Objective.cross_entropy([1, 2]),
            epsilon=0.1,
            step_size=0.05,
            steps=2,
        ),  # fmt: skip
        lambda c: list(c.analyze_many("seed-convnet", [x, x], ["relu_1"], Objective.sum())),
    ]
    errors: list[BaseException] = []

    def client_thread(call: Callable[[Client], object]) -> None:
        try:
            with Client(served.address, timeout=60) as c:
                for _ in range(2):
                    call(c)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client_thread, args=(call,)) for call in calls * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(grad_threads) >= 2 * len(calls) * 2
    assert set(grad_threads) == {"gradtap-compute-0"}
