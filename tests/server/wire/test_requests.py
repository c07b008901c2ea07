"""Requests are checked in full, and once, before any of their tensors is copied."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
import torch
from gradtap.server.errors import InvalidArgument, ResourceExhausted
from gradtap.server.models.model import Model
from gradtap.server.models.registry import Registry
from gradtap.server.models.zoo import export_builtin
from gradtap.server.wire import requests
from gradtap.server.wire.requests import Limits

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def mlp() -> Model:
    return Registry(torch.device("cpu")).add("mlp", "test", export_builtin("seed-mlp"))


def analyze_request(x: np.ndarray) -> pb.AnalyzeRequest:
    return pb.AnalyzeRequest(
        model=pb.Model(name="mlp"),
        inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=x.shape, data=x.tobytes())],
        targets=[pb.TargetLayer(name="relu_1", capture=pb.CAPTURE_GRADIENT_AND_ACTIVATION)],
        objective=pb.Objective(sum=pb.SumObjective()),
    )


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The fields whose bytes were copied out of a request."""
    copied: list[str] = []
    original = requests.copied

    def recorded(message: pb.Tensor, meta: torch.Tensor) -> torch.Tensor:
        copied.append(str(list(meta.shape)))
        return original(message, meta)

    monkeypatch.setattr(requests, "copied", recorded)
    return copied


def test_inputs_that_do_not_fit_the_model_are_refused_before_any_copy(
    mlp: Model, copies: list[str]
) -> None:
    with pytest.raises(InvalidArgument) as info:
        requests.analyze(analyze_request(np.zeros((2, 783), np.float32)), mlp, Limits())
    assert info.value.reason == "WRONG_SHAPE" and copies == []


def test_a_result_over_the_budget_is_refused_before_any_copy(mlp: Model, copies: list[str]) -> None:
    with pytest.raises(ResourceExhausted) as info:
        requests.analyze(
            analyze_request(np.zeros((8, 784), np.float32)), mlp, Limits(max_result_bytes=1024)
        )
    assert info.value.reason == "RESULT_TOO_LARGE" and copies == []


def test_a_checked_request_is_copied_once_into_host_tensors(mlp: Model, copies: list[str]) -> None:
    x = np.arange(2 * 784, dtype=np.float32).reshape(2, 784)
    call = requests.analyze(analyze_request(x), mlp, Limits())
    (tensor,) = call.analysis.inputs
    assert tensor.device.type == "cpu" and copies == ["[2, 784]"]
    np.testing.assert_array_equal(tensor.numpy(), x)


def test_every_call_checks_its_inputs_once(address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[int] = []
    original = Model.check_inputs

    def counted(self: Model, inputs: Any) -> None:
        checks.append(1)
        original(self, inputs)

    monkeypatch.setattr(Model, "check_inputs", counted)
    x = np.ones((1, 784), np.float32)
    inputs = [pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=x.shape, data=x.tobytes())]
    model = pb.Model(name="seed-mlp")
    logit = pb.Objective(logit=pb.LogitObjective(index=[1]))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        request = analyze_request(x)
        request.model.name = "seed-mlp"
        list(stub.Analyze(request, timeout=30))
        assert len(checks) == 1
        method = pb.ATTRIBUTION_METHOD_SALIENCY
        attribute = pb.AttributeRequest(model=model, inputs=inputs, method=method, index=[3])
        list(stub.Attribute(attribute, timeout=30))
        assert len(checks) == 2
        perturb = pb.PerturbRequest(
            model=model,
            inputs=inputs,
            method=pb.PERTURB_METHOD_PGD,
            objective=logit,
            epsilon=0.1,
            step_size=0.01,
            steps=4,
        )
        responses = list(stub.Perturb(perturb, timeout=30))
        assert responses[-1].HasField("summary")
        assert len(checks) == 3  # not once more per step
