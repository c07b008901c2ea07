"""Engine behaviours below the wire: cancellation between layers, bf16 autocast."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from gradtap.client import Client, GradtapError, Objective
from gradtap.server import Settings, start
from gradtap.server.engine import budget
from gradtap.server.engine.analysis import Analysis, Engine, Outcome, Role, Target
from gradtap.server.engine.objectives import Objective as EngineObjective
from gradtap.server.errors import Cancelled, InvalidArgument
from gradtap.server.models.model import Model
from gradtap.server.models.registry import Registry
from gradtap.server.models.zoo import builtin_module, export_builtin
from torch import nn


class Deep(nn.Module):
    def __init__(self, depth: int = 12) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.fixture(scope="module")
def deep() -> tuple[Engine, Registry]:
    registry = Registry(torch.device("cpu"))
    registry.add("deep", "test", torch.export.export(Deep(), (torch.zeros(2, 16),)))
    return Engine(torch.device("cpu")), registry


def test_a_cancelled_call_stops_within_one_layer(deep: tuple[Engine, Registry]) -> None:
    engine, registry = deep
    model = registry.get("deep")
    assert model is not None
    analysis = Analysis(
        inputs=[torch.zeros(2, 16)],
        targets=[Target("layers.11")],
        objective=EngineObjective("sum"),
    )
    calls = 0

    def never() -> bool:
        nonlocal calls
        calls += 1
        return False

    engine.analyze(model, analysis, never)
    layers = sum(1 for n in model.program.graph.nodes if n.op == "call_function")
    assert calls >= layers  # the caller is checked after every operator

    seen = 0

    def after_three() -> bool:
        nonlocal seen
        seen += 1
        return seen > 3

    with pytest.raises(Cancelled):
        engine.analyze(model, analysis, after_three)
    assert seen == 4  # stopped at the first check that saw the cancellation


def test_bfloat16_autocast_matches_in_process_autocast(client: Client) -> None:
    torch.manual_seed(8)
    model = builtin_module("seed-convnet")
    x = torch.randn(2, 3, 28, 28, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        logits, intermediate = model(x)
    (grad,) = torch.autograd.grad(logits.float().sum(), intermediate)
    r = client.analyze(
        "seed-convnet", x.detach().numpy(), ["relu_1"], Objective.sum(), precision="bfloat16"
    )
    assert r.metadata["precision"] == "bfloat16-autocast"
    np.testing.assert_allclose(
        r.gradients["relu_1"].astype(np.float32), grad.float().numpy(), rtol=1e-2, atol=1e-3
    )
    full = client.analyze("seed-convnet", x.detach().numpy(), ["relu_1"], Objective.sum())
    assert full.metadata["precision"] == "full"
    assert not np.array_equal(full.gradients["relu_1"], r.gradients["relu_1"])


def test_exported_builtins_have_a_dynamic_batch_dimension() -> None:
    program = export_builtin("seed-mlp")
    (x,) = [n for n in program.graph.nodes if n.op == "placeholder" and n.name == "x"]
    assert not isinstance(x.meta["val"].shape[0], int)


def test_result_size_is_estimated_from_the_graph() -> None:
    registry = Registry(torch.device("cpu"))
    model = registry.add("convnet", "test", export_builtin("seed-convnet"))
    x = torch.zeros(3, 3, 28, 28)
    analysis = Analysis(
        inputs=[x],
        targets=[Target("relu_1", activation=True, gradient=True)],
        input_gradients=True,
        outputs=True,
    )
    relu = 3 * 64 * 24 * 24 * 4
    assert budget.result_bytes(model, analysis) == 2 * relu + x.nbytes + 3 * 10 * 4 + relu


def test_results_over_the_byte_budget_are_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.export.save(export_builtin("seed-mlp"), tmp_path / "mlp.pt2")
    limit = 64 * 4 * 2 + 10 * 4 + 64 * 4  # batch 2: relu_1 activation and gradient, outputs
    settings = Settings(
        device="cpu", builtins=False, model_repository=tmp_path, max_result_bytes=limit
    )
    running = start("127.0.0.1:0", settings)
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=30) as c:
            x = np.zeros((1, 784), np.float32)
            ok = c.analyze("mlp", x, ["relu_1"], Objective.sum(), activations=True)
            assert ok.metadata["bytes_received"] <= limit
            ran: list[int] = []
            monkeypatch.setattr(Engine, "analyze", lambda *a, **k: ran.append(1))
            with pytest.raises(GradtapError) as info:
                c.analyze(
                    "mlp",
                    np.zeros((3, 784), np.float32),
                    ["relu_1"],
                    Objective.sum(),
                    activations=True,
                )
            assert info.value.code.name == "RESOURCE_EXHAUSTED"
            assert info.value.reason == "RESULT_TOO_LARGE" and ran == []
    finally:
        running.server.stop(None).wait()


def test_evicted_graph_variants_release_their_generated_source() -> None:
    """torch.fx keeps every compiled graph's source forever unless it is released."""
    import torch.fx.graph_module as fx_module

    registry = Registry(torch.device("cpu"))
    model = registry.add("mlp", "test", export_builtin("seed-mlp"))
    engine = Engine(torch.device("cpu"))
    nodes = [n for n in model.nodes if model.nodes[n].differentiable]
    combos = [c for k in (1, 2, 3) for c in itertools.combinations(nodes, k)][:40]
    assert len(combos) == 40
    before = len(fx_module._loader.eval_cache)
    for _ in range(3):
        for combo in combos:
            targets = [Target(n) for n in combo]
            analysis = Analysis([torch.zeros(1, 784)], targets, EngineObjective("sum"))
            engine.analyze(model, analysis)
    assert len(fx_module._loader.eval_cache) - before <= 32


def test_sets_past_the_compiled_ones_run_interpreted_with_the_same_numbers() -> None:
    registry = Registry(torch.device("cpu"))
    model = registry.add("mlp", "test", export_builtin("seed-mlp"))
    nodes = [n for n in model.nodes if model.nodes[n].differentiable]
    combos = [c for k in (1, 2, 3) for c in itertools.combinations(nodes, k)][:40]
    x = torch.randn(2, 784, generator=torch.Generator().manual_seed(1))

    def run(engine: Engine, combo: tuple[str, ...]) -> Outcome:
        targets = [Target(n, activation=True) for n in combo]
        return engine.analyze(
            model, Analysis([x], targets, EngineObjective("sum"), input_gradients=True)
        )

    busy = Engine(torch.device("cpu"))
    for combo in combos[:32]:
        run(busy, combo)
    for combo in combos[32:]:
        interpreted, compiled = run(busy, combo), run(Engine(torch.device("cpu")), combo)
        assert len(interpreted.tensors) == len(compiled.tensors) > 0
        for a, b in zip(interpreted.tensors, compiled.tensors):
            assert (a.role, a.name) == (b.role, b.name)
            assert torch.equal(a.tensor, b.tensor)


def test_a_repeated_request_shape_reuses_its_plan_and_errors_stay_per_call() -> None:
    """Plans are kept per model and request shape: the numbers match a fresh engine's, the
    objective's site still counts, and refused requests are refused every time."""
    registry = Registry(torch.device("cpu"))
    model = registry.add("mlp", "test", export_builtin("seed-mlp"))
    engine = Engine(torch.device("cpu"))
    x = torch.randn(2, 784, generator=torch.Generator().manual_seed(2))
    targets = [Target("relu_1", activation=True)]

    def analysis(objective: EngineObjective | None) -> Analysis:
        return Analysis([x.clone()], targets, objective, input_gradients=True, outputs=True)

    fresh = Engine(torch.device("cpu")).analyze(model, analysis(EngineObjective("sum")))
    for _ in range(3):
        again = engine.analyze(model, analysis(EngineObjective("sum")))
        assert [(c.role, c.name, c.index) for c in again.tensors] == [
            (c.role, c.name, c.index) for c in fresh.tensors
        ]
        assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(again.tensors, fresh.tensors))
        assert again.loss == fresh.loss
    at_node = engine.analyze(model, analysis(EngineObjective("sum", node="relu_1")))
    (gradient,) = [c.tensor for c in at_node.tensors if c.role == Role.GRADIENT]
    assert torch.equal(gradient, torch.ones_like(gradient))  # d sum(relu_1) / d relu_1
    for _ in range(2):
        with pytest.raises(InvalidArgument) as info:
            engine.analyze(model, analysis(None))
        assert info.value.reason == "OBJECTIVE_REQUIRED"
        with pytest.raises(InvalidArgument) as info:
            engine.analyze(model, analysis(EngineObjective("sum", output=5)))
        assert info.value.reason == "UNKNOWN_OUTPUT"


def test_a_plan_resolves_each_name_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Targets and the objective's node are resolved once, when the plan is made; a request
    of a planned shape resolves nothing."""
    model = Registry(torch.device("cpu")).add("mlp", "test", export_builtin("seed-mlp"))
    asked: list[str] = []
    resolve = Model.resolve

    def counted(self: Model, name: str) -> str | None:
        asked.append(name)
        return resolve(self, name)

    monkeypatch.setattr(Model, "resolve", counted)
    engine = Engine(torch.device("cpu"))
    analysis = Analysis(
        [torch.zeros(1, 784)], [Target("fc2")], EngineObjective("sum", node="relu_1")
    )
    engine.analyze(model, analysis)
    engine.analyze(model, analysis)
    assert sorted(asked) == ["fc2", "relu_1"]
