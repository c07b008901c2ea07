"""Every class of bad request gets its documented status, names its field, and costs nothing."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
import torch
from gradtap.client import Client, GradtapError, Objective
from gradtap.server.engine.analysis import Engine

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

from ...conftest import Served

X = np.random.default_rng(0).standard_normal((1, 3, 28, 28)).astype(np.float32)
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def raw_analyze(address: str, request: pb.AnalyzeRequest) -> list[pb.AnalyzeResponse]:
    """Sends a hand-built request, as a client in another language could."""
    with grpc.insecure_channel(address) as channel:
        return list(pb_grpc.GradientServiceStub(channel).Analyze(request, timeout=30))


def tensor(array: np.ndarray, dtype: int = pb.DTYPE_FLOAT32) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=array.shape, data=array.tobytes())


def request(**kwargs: object) -> pb.AnalyzeRequest:
    base: dict[str, object] = {
        "model": pb.Model(name="seed-convnet"),
        "inputs": [tensor(X)],
        "targets": [pb.TargetLayer(name="relu_1")],
        "objective": pb.Objective(sum=pb.SumObjective()),
    }
    base.update(kwargs)
    return pb.AnalyzeRequest(**base)  # type: ignore[arg-type]


def failure(call: Callable[[], object]) -> GradtapError:
    with pytest.raises(GradtapError) as info:
        call()
    return info.value


def raw_failure(address: str, req: pb.AnalyzeRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        raw_analyze(address, req)
    return info.value


@pytest.fixture(autouse=True)
def server_still_serves(client: Client) -> object:
    """After every bad request the server still answers a good one with the right numbers."""
    before = client.analyze("seed-mlp", np.ones((1, 784), np.float32), ["relu_1"], Objective.sum())
    yield
    after = client.analyze("seed-mlp", np.ones((1, 784), np.float32), ["relu_1"], Objective.sum())
    np.testing.assert_array_equal(before.gradients["relu_1"], after.gradients["relu_1"])
    assert client.health() == "SERVING"


def test_unknown_model_is_not_found_naming_the_field(client: Client) -> None:
    e = failure(lambda: client.analyze("no-such-model", X, ["relu_1"], Objective.sum()))
    assert e.code == grpc.StatusCode.NOT_FOUND
    assert e.field == "model.name" and e.reason == "MODEL_NOT_FOUND"
    assert failure(lambda: client.describe("no-such-model")).code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "a/b", "x" * 200, " seed-mlp", "seed-mlp\x00"]
)
def test_model_names_outside_the_pattern_are_invalid_and_never_paths(
    client: Client, name: str
) -> None:
    e = failure(lambda: client.describe(name))
    assert e.code == INVALID and e.field == "model.name" and e.reason == "BAD_MODEL_NAME"
    assert "passwd" not in e.message


def test_missing_model_name_is_invalid_argument(address: str) -> None:
    e = raw_failure(address, request(model=pb.Model()))
    assert e.code() == INVALID and "model.name" in (e.details() or "")


def test_unknown_target_is_invalid_argument_naming_the_field(client: Client) -> None:
    e = failure(lambda: client.analyze("seed-convnet", X, ["relu_1", "nope"], Objective.sum()))
    assert e.code == INVALID and e.field == "targets[1].name" and e.reason == "UNKNOWN_TARGET"


def test_duplicate_target_is_invalid_argument(client: Client) -> None:
    e = failure(lambda: client.analyze("seed-convnet", X, ["relu_1", "relu_1"], Objective.sum()))
    assert e.code == INVALID and e.field == "targets[1].name" and e.reason == "DUPLICATE_TARGET"


def test_wrong_shape_is_invalid_argument_naming_the_input(client: Client) -> None:
    e = failure(lambda: client.analyze("seed-convnet", X[:, :, :20], ["relu_1"], Objective.sum()))
    assert e.code == INVALID and e.field == "inputs[0].shape" and e.reason == "WRONG_SHAPE"
    assert "[1, 3, 20, 28]" in e.message


def test_wrong_rank_is_invalid_argument(client: Client) -> None:
    e = failure(lambda: client.analyze("seed-convnet", X[0], ["relu_1"], Objective.sum()))
    assert e.code == INVALID and e.field == "inputs[0].shape"


def test_batch_past_the_exported_range_is_invalid_argument(client: Client) -> None:
    big = np.zeros((4097, 784), np.float32)
    e = failure(lambda: client.analyze("seed-mlp", big, ["relu_1"], Objective.sum()))
    assert e.code == INVALID and e.field == "inputs[0].shape"


def test_wrong_dtype_is_invalid_argument_naming_both_dtypes(client: Client) -> None:
    e = failure(
        lambda: client.analyze("seed-convnet", X.astype(np.float64), ["relu_1"], Objective.sum())
    )
    assert e.code == INVALID and e.field == "inputs[0].dtype" and e.reason == "WRONG_DTYPE"
    assert "float64" in e.message and "float32" in e.message


def test_wrong_input_count_is_invalid_argument(client: Client) -> None:
    e = failure(lambda: client.analyze("seed-convnet", [X, X], ["relu_1"], Objective.sum()))
    assert e.code == INVALID and e.field == "inputs" and e.reason == "WRONG_INPUT_COUNT"


@pytest.mark.parametrize("extra", [-4, -1, 1, 1000])
def test_data_bytes_that_do_not_match_shape_are_invalid_argument(address: str, extra: int) -> None:
    data = X.tobytes()
    bad = data[:extra] if extra < 0 else data + b"\x00" * extra
    req = request(inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=X.shape, data=bad)])
    e = raw_failure(address, req)
    assert e.code() == INVALID and "inputs[0].data" in (e.details() or "")


@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, 99])
def test_unknown_dtype_is_invalid_argument(address: str, dtype: int) -> None:
    e = raw_failure(
        address, request(inputs=[pb.Tensor(dtype=dtype, shape=X.shape, data=X.tobytes())])
    )
    assert e.code() == INVALID and "inputs[0].dtype" in (e.details() or "")


def test_rank_above_eight_is_refused_before_allocation(address: str) -> None:
    req = request(inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 9, data=b"\x00" * 4)])
    assert raw_failure(address, req).code() == INVALID


def test_huge_declared_shape_is_resource_exhausted_without_allocating(address: str) -> None:
    req = request(inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1 << 20, 1 << 20], data=b"")])
    assert raw_failure(address, req).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_negative_dimension_is_invalid_argument(address: str) -> None:
    req = request(inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1, 3, 28, 28], data=b"")])
    assert raw_failure(address, req).code() == INVALID


def test_gradients_without_objective_are_invalid_argument(client: Client) -> None:
    e = failure(lambda: client.analyze("seed-convnet", X, ["relu_1"], None, input_grads=True))
    assert e.code == INVALID and e.field == "objective" and e.reason == "OBJECTIVE_REQUIRED"


def test_objective_without_kind_is_invalid_argument(address: str) -> None:
    e = raw_failure(address, request(objective=pb.Objective()))
    assert e.code() == INVALID and "objective" in (e.details() or "")


@pytest.mark.parametrize(
    ("objective", "field"),
    [
        (Objective.logit(10), "objective.logit.index"),
        (Objective.logit([1, 2]), "objective.logit.index"),
        (Objective.cross_entropy([10]), "objective.cross_entropy.labels"),
        (Objective.cross_entropy([1, 2]), "objective.cross_entropy.labels"),
        (Objective.mse(np.zeros((1, 9), np.float32)), "objective.mse.expected"),
        (
            Objective.grad_outputs(np.zeros((2, 10), np.float32)),
            "objective.grad_outputs.grad_output",
        ),
        (Objective.sum(output=2), "objective.sum.site.output"),
        (Objective.mse(np.zeros((1, 10), np.float32), node="nope"), "objective.mse.site.node"),
    ],
)
def test_objectives_that_do_not_fit_the_model_are_invalid_argument(
    client: Client, objective: Objective, field: str
) -> None:
    e = failure(lambda: client.analyze("seed-convnet", X, ["relu_1"], objective))
    assert e.code == INVALID and e.field == field


def test_pinned_digest_mismatch_is_failed_precondition(client: Client) -> None:
    e = failure(lambda: client.describe("seed-mlp", digest="sha256:" + "0" * 64))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.field == "model.digest"
    good = client.describe("seed-mlp").digest
    assert client.describe("seed-mlp", digest=good).digest == good


def test_gradient_of_an_integer_node_is_invalid_argument(client: Client) -> None:
    ids = np.zeros((1, 7), np.int64)
    mask = np.ones((1, 7), bool)
    e = failure(lambda: client.analyze("tokens", [ids, mask], ["ids"], Objective.sum()))
    assert (
        e.code == INVALID and e.field == "targets[0].capture" and e.reason == "NOT_DIFFERENTIABLE"
    )


def test_out_of_range_token_ids_are_invalid_argument_without_torch_internals(
    client: Client,
) -> None:
    ids = np.full((1, 7), 500, np.int64)
    mask = np.ones((1, 7), bool)
    e = failure(lambda: client.analyze("tokens", [ids, mask], ["embed"], Objective.sum()))
    assert e.code == INVALID and e.reason == "MODEL_REJECTED_INPUT"
    assert "/" not in e.message and "Traceback" not in e.message


def test_bool_bytes_other_than_zero_or_one_are_invalid(address: str) -> None:
    ids = np.zeros((1, 7), np.int64)
    req = pb.AnalyzeRequest(
        model=pb.Model(name="tokens"),
        inputs=[
            tensor(ids, pb.DTYPE_INT64),
            pb.Tensor(dtype=pb.DTYPE_BOOL, shape=[1, 7], data=b"\x01\x02\x01\x01\x01\x01\x01"),
        ],
        targets=[pb.TargetLayer(name="embed")],
        objective=pb.Objective(sum=pb.SumObjective()),
    )
    e = raw_failure(address, req)
    assert e.code() == INVALID and "inputs[1].data" in (e.details() or "")


def test_unexpected_errors_are_internal_without_paths_or_tracebacks(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "secret state in /srv/models/private.pt2\nTraceback (most recent call last)"
        )

    monkeypatch.setattr(Engine, "analyze", broken)
    e = failure(lambda: client.analyze("seed-convnet", X, ["relu_1"], Objective.sum()))
    assert e.code == grpc.StatusCode.INTERNAL and e.reason == "INTERNAL"
    assert "/srv" not in e.message and "Traceback" not in e.message and "secret" not in e.message


def _hooks(served: Served) -> list[object]:
    found: list[object] = []
    for model in served.running.registry:
        for module in model.program.graph_module.modules():
            found += [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
            found += [*module._backward_hooks.values(), *module._backward_pre_hooks.values()]
    from torch.nn.modules import module as nn_module

    found += [*nn_module._global_forward_hooks.values(), *nn_module._global_backward_hooks.values()]
    found += [*nn_module._global_forward_pre_hooks.values()]
    return found


def test_failed_requests_leave_no_hooks_behind(client: Client, served: Served) -> None:
    assert _hooks(served) == []
    # Fails after the forward pass (the objective does not fit the output).
    failure(lambda: client.analyze("seed-convnet", X, ["relu_1"], Objective.cross_entropy([11])))
    failure(lambda: client.analyze("seed-convnet", X, ["nope"], Objective.sum()))
    assert _hooks(served) == []
    assert torch.is_inference_mode_enabled() is False
