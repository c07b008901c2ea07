"""The served graph: in-place operators made functional where exact (a node holds the value it
computed, and its gradient is taken there), notes where they cannot be, every call of a
module named, and constant inputs folded in; each against eager PyTorch."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from gradtap.server.engine.analysis import Analysis, Engine, Target
from gradtap.server.engine.objectives import Objective
from gradtap.server.models.archive import read_archive
from gradtap.server.models.model import Model, prepare
from torch import nn

from ...real_models import InPlaceBlock, in_place_block

RTOL, ATOL = 1e-5, 1e-6


def served(module: nn.Module, *args: Any, **kwargs: Any) -> Model:
    """The module as gradtap serves it: exported, saved, loaded by the safe loader."""
    program = torch.export.export(module, args, kwargs)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    archive = read_archive(buffer.getvalue())
    return prepare("m", "test", archive.program, torch.device("cpu"), renamed=archive.renamed)


def reference(block: InPlaceBlock, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """InPlaceBlock's forward written without in-place operators, keeping every value."""
    values: dict[str, torch.Tensor] = {}
    bn = block.bn1(block.conv1(x))
    relu1 = F.relu(bn)
    conv2 = block.conv2(relu1)
    relu2 = F.relu(conv2 + x)
    shifted = relu2 + 1.0
    shifted = torch.cat([shifted[:, :1] * 2.0, shifted[:, 1:]], 1)  # head.mul_(2.0), a view
    relu3 = F.relu(shifted - 0.5)
    out = block.fc(F.adaptive_avg_pool2d(relu3, 1).flatten(1))
    values.update(bn=bn, relu1=relu1, conv2=conv2, relu2=relu2, relu3=relu3, out=out)
    if torch.is_grad_enabled():
        for value in values.values():
            value.retain_grad()
    return values


@pytest.fixture(scope="module")
def block() -> tuple[InPlaceBlock, Model, torch.Tensor]:
    torch.manual_seed(0)
    module = in_place_block()
    assert isinstance(module, InPlaceBlock)
    x = torch.randn(2, 4, 8, 8)
    return module, served(module, x), x


def _analyze(model: Model, x: torch.Tensor, *names: str) -> dict[tuple[str, str], torch.Tensor]:
    outcome = Engine(torch.device("cpu")).analyze(
        model,
        Analysis(
            inputs=[x],
            targets=[Target(n, activation=True) for n in names],
            objective=Objective("logit", index=(1,)),
        ),
    )
    return {(c.role.value, c.name): c.tensor for c in outcome.tensors}


def test_the_reference_is_the_block(block: tuple[InPlaceBlock, Model, torch.Tensor]) -> None:
    module, _, x = block
    with torch.no_grad():
        torch.testing.assert_close(reference(module, x)["out"], module(x.clone()))


def test_a_node_before_an_in_place_relu_holds_its_own_value_and_gradient(
    block: tuple[InPlaceBlock, Model, torch.Tensor],
) -> None:
    module, model, x = block
    # The export keeps relu_ on batch norm's output (eager retain_grad() sees it after).
    assert any(n.note.startswith("aten.relu_.default in the export") for n in model.nodes.values())
    got = _analyze(model, x, "bn1", "conv2")
    want = reference(module, x)
    want["out"][:, 1].sum().backward()
    assert (got[("activation", "bn1")] < 0).any()  # before the ReLU: negatives survive
    for name, key in (("bn1", "bn"), ("conv2", "conv2")):
        torch.testing.assert_close(got[("activation", name)], want[key], rtol=RTOL, atol=ATOL)
        grad = want[key].grad
        assert grad is not None
        torch.testing.assert_close(got[("gradient", name)], grad, rtol=RTOL, atol=ATOL)


def test_every_call_of_a_module_is_named_and_the_plain_path_is_the_last(
    block: tuple[InPlaceBlock, Model, torch.Tensor],
) -> None:
    module, model, x = block
    calls = model.module_calls["relu"]
    assert len(calls) == 3
    assert model.resolve("relu#1") == calls[0] and model.resolve("relu#3") == calls[2]
    assert model.resolve("relu") == calls[2]
    assert model.resolve("relu#4") is None and model.resolve("relu#0") is None
    got = _analyze(model, x, "relu#1", "relu#2", "relu#3", "relu")
    want = reference(module, x)
    want["out"][:, 1].sum().backward()
    pairs = (("relu#1", "relu1"), ("relu#2", "relu2"), ("relu#3", "relu3"), ("relu", "relu3"))
    for name, key in pairs:
        torch.testing.assert_close(got[("activation", name)], want[key], rtol=RTOL, atol=ATOL)
        grad = want[key].grad
        assert grad is not None
        torch.testing.assert_close(got[("gradient", name)], grad, rtol=RTOL, atol=ATOL)


def test_a_write_through_a_view_stays_in_place_and_says_so(
    block: tuple[InPlaceBlock, Model, torch.Tensor],
) -> None:
    _, model, _ = block
    noted = {n.name: n.note for n in model.nodes.values() if "cannot undo" in n.note}
    assert noted, "the in-place write into a view should leave a note"
    assert any("view" in note for note in noted.values())
    # The graph still runs the write in place, as the module does.
    assert any(n.op == "aten.mul_.Tensor" for n in model.nodes.values())


def test_a_constant_input_is_folded_in_and_callers_send_tensors_only() -> None:
    class Scaled(nn.Module):
        def forward(self, x: torch.Tensor, *, scale: float, double: bool) -> torch.Tensor:
            return x * scale * (2 if double else 1)

    x = torch.randn(2, 3)
    model = served(Scaled(), x, scale=3.0, double=True)
    assert model.fixed_inputs == {"scale": 3.0, "double": True}
    assert [s.name for s in model.inputs] == ["x"] and [s.name for s in model.outputs] == ["output"]
    outcome = Engine(torch.device("cpu")).analyze(model, Analysis(inputs=[x], outputs=True))
    torch.testing.assert_close(outcome.tensors[0].tensor, x * 6)
