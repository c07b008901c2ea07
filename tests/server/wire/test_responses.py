"""Summaries: each timing is set in one place, the engine's by the engine, the call's here."""

from __future__ import annotations

import time

import pytest
import torch
from gradtap.server.engine.analysis import Analysis, Engine, Target
from gradtap.server.engine.objectives import Objective
from gradtap.server.models.registry import Registry
from gradtap.server.models.zoo import export_builtin
from gradtap.server.wire import responses


def test_the_engine_times_its_own_work_and_the_wire_times_the_call() -> None:
    model = Registry(torch.device("cpu")).add("mlp", "test", export_builtin("seed-mlp"))
    started = time.perf_counter()
    decoded = started + 0.002
    outcome = Engine(torch.device("cpu")).analyze(
        model, Analysis([torch.zeros(1, 784)], [Target("relu_1")], Objective("sum"))
    )
    assert set(outcome.timings) == {"forward_ms", "backward_ms", "collect_ms"}
    summary = responses.analyze_summary(outcome, model, "here:1", started, decoded)
    timings = summary.timings
    assert timings.decode_ms == pytest.approx(2.0)
    assert timings.forward_ms == outcome.timings["forward_ms"]
    assert timings.backward_ms == outcome.timings["backward_ms"]
    assert timings.collect_ms == outcome.timings["collect_ms"]
    assert timings.total_ms >= timings.forward_ms + timings.backward_ms + timings.collect_ms
