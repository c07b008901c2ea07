"""The compute threads: computations run there, in order, and come back as if run inline."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
from gradtap.server.engine.compute import Compute, default_threads, on_compute_thread


@pytest.fixture
def compute() -> Iterator[Compute]:
    c = Compute(1, name="test-compute")
    yield c
    c.close()


def test_a_computation_runs_on_a_compute_thread_and_returns_its_result(compute: Compute) -> None:
    assert compute.run(lambda a, b: (threading.current_thread().name, a + b), 2, 3) == (
        "test-compute-0",
        5,
    )
    assert not on_compute_thread()


def test_an_exception_is_raised_in_the_callers_thread(compute: Compute) -> None:
    def fails() -> None:
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        compute.run(fails)
    assert compute.run(lambda: 7) == 7  # the thread lives on


def test_work_handed_on_from_a_computation_runs_inline_instead_of_waiting_for_itself(
    compute: Compute,
) -> None:
    def outer() -> tuple[str, str]:
        return threading.current_thread().name, compute.run(lambda: threading.current_thread().name)

    assert compute.run(outer) == ("test-compute-0", "test-compute-0")


def test_iterate_runs_each_step_on_a_compute_thread(compute: Compute) -> None:
    def steps() -> Iterator[str]:
        for _ in range(3):
            yield threading.current_thread().name

    assert list(compute.iterate(steps())) == ["test-compute-0"] * 3


def test_computations_from_many_threads_all_run_on_the_one_thread(compute: Compute) -> None:
    names: list[str] = []
    callers = [
        threading.Thread(
            target=lambda: names.append(compute.run(lambda: threading.current_thread().name))
        )
        for _ in range(8)
    ]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert names == ["test-compute-0"] * 8


def test_without_threads_a_computation_runs_on_its_callers_thread() -> None:
    inline = Compute(0)
    assert inline.run(lambda: threading.current_thread().name) == threading.current_thread().name


def test_one_computation_at_a_time_on_the_cpu_more_on_a_gpu() -> None:
    assert default_threads(torch.device("cpu")) == 1
    assert default_threads(torch.device("cuda")) == 2
