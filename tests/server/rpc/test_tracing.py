"""Optional OpenTelemetry tracing: every RPC becomes a span of the process's tracer provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gradtap.client import Client, Objective
from gradtap.server import Settings, start
from gradtap.server.models.zoo import export_builtin

trace = pytest.importorskip("opentelemetry.trace", reason="the otel extra is not installed")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
export = pytest.importorskip("opentelemetry.sdk.trace.export")
in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")


def test_rpcs_become_spans_when_tracing_is_on(tmp_path: Path) -> None:
    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    torch.export.save(export_builtin("seed-mlp"), tmp_path / "mlp.pt2")
    settings = Settings(device="cpu", builtins=False, model_repository=tmp_path, tracing=True)
    running = start("127.0.0.1:0", settings)
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=30) as c:
            r = c.analyze("mlp", np.zeros((1, 784), np.float32), ["relu_1"], Objective.sum())
            assert r.gradients["relu_1"].shape == (1, 64)
            c.list_models()
    finally:
        running.server.stop(None).wait()
    names = [s.name for s in exporter.get_finished_spans()]
    assert "/gradtap.v1.GradientService/Analyze" in names
    assert "/gradtap.v1.GradientService/ListModels" in names
