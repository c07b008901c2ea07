"""The working-memory estimate against measured peaks, and the budget's accounting."""

from __future__ import annotations

import threading

import pytest
import torch
from gradtap.server.engine.attribution import Attribution, passes
from gradtap.server.engine.memory import Estimate, MemoryBudget, parse_budget
from gradtap.server.errors import Cancelled, InvalidArgument, ResourceExhausted
from gradtap.server.models.model import prepare
from gradtap.server.models.zoo import export_builtin

from bench import memory_estimate


@pytest.mark.parametrize(
    "case",
    [
        "seed-convnet analyze b256 input grads + conv2",
        "seed-mlp smoothgrad b256 nt 64x64",
        "seed-convnet pgd b128 3 steps",
    ],
)
def test_the_estimate_is_at_least_the_measured_peak(case: str) -> None:
    row = memory_estimate._case(case)
    assert row["measured"] > 8 << 20, row  # the call did allocate: the comparison means something
    assert row["estimate"] >= row["measured"], row
    assert row["estimate"] <= 5 * row["measured"] + (16 << 20), row


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("8GiB", 8 << 30), ("512MiB", 512 << 20), ("2GB", 2 * 10**9), ("1e9", 10**9), ("50%", 50)],
)
def test_a_budget_is_bytes_or_a_share_of_the_machine(text: str, nbytes: int) -> None:
    machine = 100 << 20 if text.endswith("%") else 1
    expected = (100 << 20) // 2 if text.endswith("%") else nbytes
    assert parse_budget(text, machine) == expected


@pytest.mark.parametrize("text", ["", "lots", "0%", "150%", "12XB", "1KiB"])
def test_a_budget_that_is_not_bytes_or_a_share_is_refused_naming_the_flag(text: str) -> None:
    with pytest.raises(ValueError, match="--memory-budget"):
        parse_budget(text, 1 << 30)


def test_a_hold_that_could_never_fit_is_refused_naming_budget_estimate_and_field() -> None:
    budget = MemoryBudget(64 << 20)
    with pytest.raises(ResourceExhausted) as refused:
        with budget.hold(Estimate(100 << 20, "params.n_steps"), "this call"):
            pass
    error = refused.value
    assert error.reason == "MEMORY_BUDGET"
    assert "100.00 MiB" in error.message and "64.00 MiB" in error.message
    assert "params.n_steps" in error.message
    assert budget.held == 0


def test_a_hold_waits_for_the_budget_then_runs_first_come_first_served() -> None:
    budget = MemoryBudget(100)
    order: list[str] = []
    first = budget.hold(Estimate(80, "inputs"), "first")
    first.__enter__()
    started = threading.Event()

    def later(name: str, nbytes: int) -> None:
        started.set()
        with budget.hold(Estimate(nbytes, "inputs"), name):
            order.append(name)

    big = threading.Thread(target=later, args=("big", 90))
    big.start()
    started.wait()
    while not budget._waiting:  # the big one is queued before the small one arrives
        threading.Event().wait(0.001)
    small = threading.Thread(target=later, args=("small", 10))
    small.start()
    assert order == []
    first.__exit__(None, None, None)
    big.join(10)
    small.join(10)
    assert order == ["big", "small"]
    assert budget.held == 0 and budget.peak == 90


def test_a_wait_ends_with_cancelled_when_the_call_stops() -> None:
    budget = MemoryBudget(100)
    with budget.hold(Estimate(100, "inputs"), "first"):
        with pytest.raises(Cancelled):
            with budget.hold(Estimate(1, "inputs"), "second", should_stop=lambda: True):
                pass
    assert budget.held == 0


@pytest.fixture(scope="module")
def mlp() -> object:
    return prepare("seed-mlp", "builtin", export_builtin("seed-mlp"), torch.device("cpu"))


def test_internal_batch_size_over_the_share_is_lowered(mlp: object) -> None:
    x = torch.zeros(4, 784)
    request = Attribution(
        [x], "integrated_gradients", (1,), params={"internal_batch_size": 10**9, "n_steps": 4096}
    )
    unbounded = passes(mlp, request)  # type: ignore[arg-type]
    bounded = passes(mlp, request, share=8 << 20)  # type: ignore[arg-type]
    assert unbounded.internal_batch_size == 10**9
    assert 4 <= bounded.internal_batch_size < 10**9
    assert bounded.params["internal_batch_size"] == bounded.internal_batch_size


def test_nt_samples_batch_size_over_the_share_is_out_of_range_naming_the_field(
    mlp: object,
) -> None:
    x = torch.zeros(256, 784)
    request = Attribution(
        [x], "smoothgrad", (1,), params={"nt_samples": 1024, "nt_samples_batch_size": 1024}
    )
    with pytest.raises(InvalidArgument) as refused:
        passes(mlp, request, share=64 << 20)  # type: ignore[arg-type]
    assert refused.value.reason == "OUT_OF_RANGE"
    assert refused.value.field == "params.nt_samples_batch_size"
    assert "at most" in refused.value.message
