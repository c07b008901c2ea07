"""Reductions before transfer: each one equals numpy on the full gradient, and the wire shrinks."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import ml_dtypes
import numpy as np
import pytest
from gradtap.client import Client, GradtapError, Objective, Target
from gradtap.client._errors import from_rpc_error

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

RTOL, ATOL = 1e-5, 1e-7
BATCH = 2
RELU_1 = (BATCH, 64, 24, 24)
"""seed-convnet's intermediate node relu_1 (the output of module conv2 after its ReLU)."""

NUMPY: dict[str, Callable[..., np.ndarray]] = {
    "sum": lambda a, axis: a.sum(axis=axis),
    "mean": lambda a, axis: a.mean(axis=axis),
    "abs_mean": lambda a, axis: np.abs(a).mean(axis=axis),
    "norm": lambda a, axis: np.sqrt((a * a).sum(axis=axis)),
    "max": lambda a, axis: a.max(axis=axis),
}


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((BATCH, 3, 28, 28)).astype(np.float32)


@pytest.fixture(scope="module")
def full(address: str) -> dict[str, np.ndarray]:
    """relu_1's full gradient and activation, and conv2's gradient, for image(0)."""
    with Client(address, timeout=60) as c:
        r = c.analyze(
            "seed-convnet",
            image(),
            ["relu_1", "conv2"],
            Objective.logit([3, 7]),
            activations=True,
            outputs=False,
        )
    assert r.gradients["relu_1"].shape == RELU_1
    return {
        "gradient": r.gradients["relu_1"].astype(np.float64),
        "activation": r.activations["relu_1"].astype(np.float64),
        "conv2": r.gradients["conv2"].astype(np.float64),
    }


def reduced(client: Client, target: Target, activations: bool = True) -> tuple:
    r = client.analyze(
        "seed-convnet",
        image(),
        [target],
        Objective.logit([3, 7]),
        activations=activations,
        outputs=False,
    )
    return r, r.gradients[target.name], r.activations.get(target.name)


@pytest.mark.parametrize("reduce", sorted(NUMPY))
@pytest.mark.parametrize(
    ("dims", "axis"),
    [((2, 3), (2, 3)), (None, (1, 2, 3)), ((0, -1), (0, 3)), ((1,), (1,))],
    ids=["per-channel", "default-per-row", "negative", "channels"],
)
def test_each_reduction_equals_numpy_on_the_full_gradient_and_activation(
    client: Client,
    full: dict[str, np.ndarray],
    reduce: str,
    dims: tuple[int, ...] | None,
    axis: tuple[int, ...],
) -> None:
    r, gradient, activation = reduced(client, Target("relu_1", reduce, dims=dims))
    expected = NUMPY[reduce](full["gradient"], axis)
    assert gradient.shape == expected.shape
    np.testing.assert_allclose(gradient, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(activation, NUMPY[reduce](full["activation"], axis), rtol=RTOL)
    # Only the two reduced tensors crossed the wire.
    assert r.metadata["bytes_received"] == 2 * expected.size * 4
    recorded = r.reductions["relu_1"]
    assert recorded.reduce == reduce
    assert recorded.dims == tuple(sorted(d % 4 for d in axis))
    assert recorded.reduced_shape == expected.shape and recorded.dtype == "float32"


def test_per_channel_weights_shrink_the_transfer_by_the_map_size(
    client: Client, full: dict[str, np.ndarray]
) -> None:
    r, gradient, _ = reduced(client, Target("relu_1", "mean", dims=(2, 3)), activations=False)
    # Grad-CAM's channel weights: one value per (row, channel) instead of a 24x24 map.
    assert r.metadata["bytes_received"] == BATCH * 64 * 4
    assert r.metadata["bytes_received"] * 24 * 24 == full["gradient"].size * 4
    np.testing.assert_allclose(gradient, full["gradient"].mean(axis=(2, 3)), rtol=RTOL, atol=ATOL)


def test_topk_keeps_the_largest_magnitudes_per_row_with_aligned_activation(
    client: Client, full: dict[str, np.ndarray]
) -> None:
    k = 10
    r, gradient, activation = reduced(client, Target("relu_1", topk=k))
    indices = r.topk_indices["relu_1"]
    assert gradient.shape == activation.shape == indices.shape == (BATCH, k)
    assert indices.dtype == np.int64
    rows = full["gradient"].reshape(BATCH, -1)
    for row in range(BATCH):
        expected = np.argsort(-np.abs(rows[row]), kind="stable")[:k]
        assert set(indices[row]) == set(expected)
        assert np.all(np.diff(np.abs(gradient[row])) <= 0)  # sorted by decreasing magnitude
    np.testing.assert_allclose(gradient, np.take_along_axis(rows, indices, axis=1), rtol=RTOL)
    acts = full["activation"].reshape(BATCH, -1)
    np.testing.assert_allclose(activation, np.take_along_axis(acts, indices, axis=1), rtol=RTOL)
    assert r.metadata["bytes_received"] == BATCH * k * (4 + 4 + 8)
    assert r.reductions["relu_1"].reduced_shape == RELU_1
    coords = np.unravel_index(indices[0, 0], RELU_1[1:])
    np.testing.assert_allclose(gradient[0, 0], full["gradient"][(0, *coords)], rtol=RTOL)


def test_topk_after_reducing_the_batch_ranks_the_whole_tensor(
    client: Client, full: dict[str, np.ndarray]
) -> None:
    target = Target("relu_1", "abs_mean", dims=(0, 2, 3), topk=5)
    r, gradient, _ = reduced(client, target, activations=False)
    channels = np.abs(full["gradient"]).mean(axis=(0, 2, 3))
    expected = np.argsort(-channels)[:5]
    np.testing.assert_array_equal(r.topk_indices["relu_1"], expected)
    np.testing.assert_allclose(gradient, channels[expected], rtol=RTOL)
    assert r.reductions["relu_1"].reduced_shape == (64,)


@pytest.mark.parametrize(
    ("dtype", "numpy_dtype"), [("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)]
)
def test_transfer_dtype_halves_the_bytes(
    client: Client, full: dict[str, np.ndarray], dtype: str, numpy_dtype: type
) -> None:
    r, gradient, _ = reduced(client, Target("relu_1", dtype=dtype), activations=False)
    assert gradient.dtype == np.dtype(numpy_dtype)
    assert r.metadata["bytes_received"] == full["gradient"].size * 2
    scale = np.abs(full["gradient"]).max()
    np.testing.assert_allclose(
        gradient.astype(np.float64), full["gradient"], rtol=1e-2, atol=1e-2 * scale
    )
    assert r.reductions["relu_1"].reduce is None and r.reductions["relu_1"].dtype == dtype


def test_as_float32_converts_a_bfloat16_transfer_on_arrival(
    client: Client, full: dict[str, np.ndarray]
) -> None:
    target = Target("relu_1", "sum", dims=(2, 3), dtype="bfloat16", as_float32=True)
    r, gradient, _ = reduced(client, target, activations=False)
    assert gradient.dtype == np.float32
    assert r.metadata["bytes_received"] == BATCH * 64 * 2
    expected = full["gradient"].sum(axis=(2, 3))
    np.testing.assert_allclose(gradient, expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())


def test_grad_cam_takes_a_reduced_gradient_and_a_whole_activation_of_one_node(
    client: Client, full: dict[str, np.ndarray]
) -> None:
    r = client.analyze(
        "seed-convnet",
        image(),
        [
            Target("relu_1", "mean", dims=(2, 3), capture="gradient"),
            Target("relu_1", capture="activation"),
        ],
        Objective.logit([3, 7]),
        outputs=False,
    )
    weights, maps = r.gradients["relu_1"], r.activations["relu_1"]
    assert weights.shape == (BATCH, 64) and maps.shape == RELU_1
    assert r.metadata["bytes_received"] == (weights.size + maps.size) * 4
    cam = np.maximum((weights[:, :, None, None] * maps).sum(axis=1), 0)
    expected_weights = full["gradient"].mean(axis=(2, 3))
    expected = np.maximum((expected_weights[:, :, None, None] * full["activation"]).sum(axis=1), 0)
    np.testing.assert_allclose(cam, expected, rtol=1e-4, atol=1e-6)


def test_plain_names_and_targets_mix_and_module_paths_reduce_too(
    client: Client, full: dict[str, np.ndarray]
) -> None:
    r = client.analyze(
        "seed-convnet",
        image(),
        ["relu_1", Target("conv2", "norm", dims=(1, 2, 3))],
        Objective.logit([3, 7]),
        outputs=False,
    )
    np.testing.assert_allclose(r.gradients["relu_1"], full["gradient"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        r.gradients["conv2"], np.linalg.norm(full["conv2"].reshape(BATCH, -1), axis=1), rtol=RTOL
    )
    assert set(r.reductions) == {"conv2"}


@pytest.mark.parametrize(
    ("target", "field", "reason"),
    [
        (Target("relu_1", "sum", dims=(4,)), "targets[0].reduction.dims", "BAD_DIMS"),
        (Target("relu_1", "sum", dims=(1, -3)), "targets[0].reduction.dims", "BAD_DIMS"),
        (Target("relu_1", topk=64 * 24 * 24 + 1), "targets[0].reduction.topk", "TOPK_TOO_LARGE"),
        (
            Target("relu_1", "mean", dims=(0, 1, 2), topk=25),
            "targets[0].reduction.topk",
            "TOPK_TOO_LARGE",
        ),
    ],
)
def test_bad_reductions_are_invalid_argument_naming_the_field(
    client: Client, target: Target, field: str, reason: str
) -> None:
    with pytest.raises(GradtapError) as info:
        client.analyze("seed-convnet", image(), [target], Objective.sum())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == field and info.value.reason == reason


def test_reducing_an_integer_node_is_invalid_argument(client: Client) -> None:
    ids = np.zeros((2, 7), dtype=np.int64)
    mask = np.ones((2, 7), dtype=bool)
    with pytest.raises(GradtapError) as info:
        client.analyze("tokens", [ids, mask], [Target("ids", "sum")])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.reason == "NOT_FLOATING_POINT"
    assert info.value.field == "targets[0].reduction"


def test_the_server_checks_what_the_client_would_refuse(address: str) -> None:
    request = pb.AnalyzeRequest(
        model=pb.Model(name="seed-convnet"),
        inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 3, 28, 28], data=bytes(4 * 2352))],
        objective=pb.Objective(sum=pb.SumObjective()),
    )
    bad = [
        (pb.TargetLayer(name="relu_1", reduction=pb.Reduction(dims=[1])), "reduction.dims"),
        (pb.TargetLayer(name="relu_1", reduction=pb.Reduction(reduce=99)), "reduction.reduce"),
        (pb.TargetLayer(name="relu_1", dtype=pb.DTYPE_INT8), "dtype"),
        (pb.TargetLayer(name="relu_1", dtype=pb.DTYPE_FLOAT64), "dtype"),
    ]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        for layer, field in bad:
            request.ClearField("targets")
            request.targets.append(layer)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Analyze(request, timeout=30))
            error = from_rpc_error(info.value)
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT, field
            assert error.field == f"targets[0].{field}"


def test_the_client_refuses_meaningless_targets() -> None:
    with pytest.raises(ValueError, match="dims needs a reduce"):
        Target("relu_1", dims=(2, 3))
    with pytest.raises(ValueError, match="reduce must be"):
        Target("relu_1", "median")
    with pytest.raises(ValueError, match="topk"):
        Target("relu_1", topk=0)
    with pytest.raises(ValueError, match="dtype"):
        Target("relu_1", dtype="int8")
