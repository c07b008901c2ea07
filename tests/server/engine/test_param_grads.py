"""Parameter gradients: the same numbers as .backward() on the in-process twin."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradtap.client import Client, GradtapError, Objective
from gradtap.server.models.zoo import builtin_module

from ... import models
from ...conftest import Served

RTOL, ATOL = 1e-5, 1e-6


def close(a: np.ndarray, b: torch.Tensor | None) -> None:
    assert b is not None
    np.testing.assert_allclose(a, b.detach().numpy(), rtol=RTOL, atol=ATOL)


def test_named_parameter_gradients_match_backward(client: Client) -> None:
    torch.manual_seed(11)
    model = builtin_module("seed-convnet")
    x = torch.randn(2, 3, 28, 28)
    labels = torch.tensor([1, 8])
    logits, _ = model(x)
    F.cross_entropy(logits, labels).backward()

    r = client.analyze(
        "seed-convnet",
        x.numpy(),
        ["relu_1"],
        Objective.cross_entropy(labels.numpy()),
        param_grads=["fc.weight", "conv1.bias"],
        outputs=False,
    )
    assert set(r.param_grads) == {"fc.weight", "conv1.bias"}
    close(r.param_grads["fc.weight"], model.fc.weight.grad)
    close(r.param_grads["conv1.bias"], model.conv1.bias.grad)
    assert "relu_1" in r.gradients


def test_star_returns_every_parameter_and_no_buffer(client: Client, served: Served) -> None:
    model = served.modules["resblock"]
    model.zero_grad()
    torch.manual_seed(12)
    x = torch.randn(3, 3, 16, 16)
    model(x)[:, 1].sum().backward()

    r = client.analyze("resblock", x.numpy(), [], Objective.logit(1), param_grads="*")
    parameters = dict(model.named_parameters())
    assert set(r.param_grads) == set(parameters) == set(client.describe("resblock").parameters)
    assert "bn1.running_mean" not in r.param_grads
    for name, parameter in parameters.items():
        close(r.param_grads[name], parameter.grad)
    model.zero_grad()


def test_embedding_weights_get_gradients_through_integer_inputs(
    client: Client, served: Served
) -> None:
    model = served.modules["tokens"]
    model.zero_grad()
    ids, mask = models.token_inputs(batch=2)
    labels = torch.tensor([0, 2])
    F.cross_entropy(model(ids, mask), labels).backward()

    r = client.analyze(
        "tokens",
        [ids.numpy(), mask.numpy()],
        [],
        Objective.cross_entropy(labels.numpy()),
        param_grads=["embed.weight", "head.bias"],
    )
    close(r.param_grads["embed.weight"], model.embed.weight.grad)
    close(r.param_grads["head.bias"], model.head.bias.grad)
    model.zero_grad()


def test_asking_for_parameter_gradients_changes_nothing_else(client: Client) -> None:
    x = np.random.default_rng(13).standard_normal((1, 3, 28, 28)).astype(np.float32)
    plain = client.analyze("seed-convnet", x, ["relu_1"], Objective.logit(4), input_grads=True)
    with_params = client.analyze(
        "seed-convnet", x, ["relu_1"], Objective.logit(4), input_grads=True, param_grads="*"
    )
    again = client.analyze("seed-convnet", x, ["relu_1"], Objective.logit(4), input_grads=True)
    for r in (with_params, again):
        np.testing.assert_array_equal(r.gradients["relu_1"], plain.gradients["relu_1"])
        np.testing.assert_array_equal(r.input_grads[0], plain.input_grads[0])
    assert again.param_grads == {} and len(with_params.param_grads) == 6
    expected = sum(a.nbytes for a in with_params.param_grads.values())
    assert with_params.metadata["bytes_received"] - plain.metadata["bytes_received"] == expected


@pytest.mark.parametrize(
    ("names", "field", "reason"),
    [
        (["fc.weight", "fc.nope"], "param_grads[1]", "UNKNOWN_PARAMETER"),
        (["bn1.running_mean"], "param_grads[0]", "NOT_A_PARAMETER"),
    ],
)
def test_unknown_parameter_is_invalid_argument_naming_the_field(
    client: Client, names: list[str], field: str, reason: str
) -> None:
    model = "resblock" if names[0].startswith("bn1") else "seed-convnet"
    shape = (1, 3, 16, 16) if model == "resblock" else (1, 3, 28, 28)
    with pytest.raises(GradtapError) as info:
        client.analyze(model, np.zeros(shape, np.float32), [], Objective.sum(), param_grads=names)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == field and info.value.reason == reason


def test_parameter_gradients_need_an_objective(client: Client) -> None:
    with pytest.raises(GradtapError) as info:
        client.analyze("seed-mlp", np.zeros((1, 784), np.float32), param_grads=["fc1.bias"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == "objective"
