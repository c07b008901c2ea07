"""analyze_many: one stream, results in order, bounded in flight, aggregates, per-item errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from gradtap.client import Aggregate, Client, GradtapError, Objective, Target, aio

from .. import models

RTOL, ATOL = 1e-5, 1e-7


def images(count: int, batch: int = 1, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, 3, 28, 28)).astype(np.float32) for _ in range(count)]


def test_results_come_back_in_order_and_equal_single_calls(client: Client) -> None:
    items = images(6, batch=2)
    stream = client.analyze_many(
        "seed-convnet", items, ["relu_1"], Objective.logit(3), input_grads=True, max_in_flight=2
    )
    results = list(stream)
    assert [r.metadata["item"] for r in results] == list(range(6))
    for x, r in zip(items, results):
        single = client.analyze("seed-convnet", x, ["relu_1"], Objective.logit(3), input_grads=True)
        np.testing.assert_allclose(r.gradients["relu_1"], single.gradients["relu_1"], rtol=RTOL)
        np.testing.assert_allclose(r.input_grads[0], single.input_grads[0], rtol=RTOL)
        np.testing.assert_allclose(r.outputs[0], single.outputs[0], rtol=RTOL)
        assert r.loss == pytest.approx(single.loss, rel=RTOL)
    assert stream.aggregate is None


def test_items_are_read_only_as_results_come_back(client: Client) -> None:
    pulled = 0
    in_flight = 3

    def lazily() -> Iterator[np.ndarray]:
        nonlocal pulled
        for x in images(12):
            pulled += 1
            yield x

    stream = client.analyze_many(
        "seed-convnet", lazily(), ["relu_1"], Objective.sum(), max_in_flight=in_flight
    )
    assert pulled == 0  # nothing is read before the first result is asked for
    for k, _ in enumerate(stream):
        # When result k arrives, one more item goes out: at most in_flight are unanswered.
        assert pulled <= in_flight + k + 1
    assert pulled == 12


def test_several_inputs_travel_as_tuples_and_objectives_may_differ_per_item(
    client: Client,
) -> None:
    ids, mask = models.token_inputs(batch=4)
    items = [(ids[i : i + 2].numpy(), mask[i : i + 2].numpy()) for i in (0, 2)]
    labels = [np.array([1, 3]), np.array([0, 2])]
    results = list(
        client.analyze_many(
            "tokens",
            items,
            ["embed"],
            lambda k: Objective.cross_entropy(labels[k]),
        )
    )
    for (i, m), y, r in zip(items, labels, results):
        single = client.analyze("tokens", [i, m], ["embed"], Objective.cross_entropy(y))
        np.testing.assert_allclose(r.gradients["embed"], single.gradients["embed"], rtol=RTOL)


def test_targets_with_reductions_and_parameter_gradients_work_per_item(client: Client) -> None:
    items = images(3)
    results = list(
        client.analyze_many(
            "seed-convnet",
            items,
            [Target("relu_1", "abs_mean", dims=(2, 3))],
            Objective.logit(0),
            param_grads=["fc.bias"],
            outputs=False,
        )
    )
    for x, r in zip(items, results):
        full = client.analyze("seed-convnet", x, ["relu_1"], Objective.logit(0))
        expected = np.abs(full.gradients["relu_1"]).mean(axis=(2, 3))
        np.testing.assert_allclose(r.gradients["relu_1"], expected, rtol=RTOL, atol=ATOL)
        assert r.param_grads["fc.bias"].shape == (10,)
        assert r.metadata["bytes_received"] == 64 * 4 + 10 * 4


def test_aggregate_is_the_mean_over_every_row_of_every_item(client: Client) -> None:
    # Items of different batch sizes: the mean is over rows, not over items.
    items = [images(1, batch=b, seed=s)[0] for b, s in ((1, 1), (3, 2), (2, 3))]
    stream = client.analyze_many(
        "seed-convnet",
        items,
        ["relu_1", "conv2"],
        Objective.logit(5),
        aggregate=True,
        per_item=False,
    )
    results = list(stream)
    assert len(results) == 3
    assert all(r.gradients == {} and r.outputs == [] for r in results)
    assert all(r.metadata["bytes_received"] == 0 for r in results)
    singles = [
        client.analyze("seed-convnet", x, ["relu_1", "conv2"], Objective.logit(5)) for x in items
    ]
    aggregate = stream.aggregate
    assert aggregate is not None
    assert aggregate.items == 3 and aggregate.rows == 6
    for name in ("relu_1", "conv2"):
        every_row = np.concatenate([s.gradients[name] for s in singles]).astype(np.float64)
        np.testing.assert_allclose(
            aggregate.mean_gradients[name], every_row.mean(axis=0), rtol=RTOL, atol=ATOL
        )
        np.testing.assert_allclose(
            aggregate.mean_abs_gradients[name],
            np.abs(every_row).mean(axis=(0, 2, 3)),
            rtol=RTOL,
            atol=ATOL,
        )
        assert aggregate.mean_abs_gradients[name].shape == (64,)
    assert aggregate.loss == pytest.approx(np.mean([s.loss for s in singles]), rel=RTOL)
    assert aggregate.metadata["model"] == "seed-convnet"
    # The aggregate crossed the wire once: a 64x24x24 mean and 64 channel values per target.
    assert aggregate.metadata["bytes_received"] == 2 * (64 * 24 * 24 + 64) * 4


def test_aggregate_of_vector_features_is_per_feature(client: Client) -> None:
    rng = np.random.default_rng(4)
    items = [rng.standard_normal((2, 784)).astype(np.float32) for _ in range(3)]
    stream = client.analyze_many(
        "seed-mlp", items, ["relu_1"], Objective.logit(2), aggregate=True, per_item=False
    )
    assert len(list(stream)) == 3
    singles = [client.analyze("seed-mlp", x, ["relu_1"], Objective.logit(2)) for x in items]
    rows = np.concatenate([s.gradients["relu_1"] for s in singles]).astype(np.float64)
    assert stream.aggregate is not None
    np.testing.assert_allclose(
        stream.aggregate.mean_abs_gradients["relu_1"], np.abs(rows).mean(axis=0), rtol=RTOL
    )


def test_aggregates_refuse_reduced_targets_naming_the_item(client: Client) -> None:
    stream = client.analyze_many(
        "seed-convnet",
        images(2),
        [Target("relu_1", "sum")],
        Objective.sum(),
        aggregate=True,
        per_item=False,
    )
    with pytest.raises(GradtapError) as info:
        list(stream)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == "items[0].targets[0].reduction"
    with pytest.raises(ValueError, match="per_item=False needs aggregate"):
        client.analyze_many("seed-convnet", [], ["relu_1"], Objective.sum(), per_item=False)


def test_a_bad_item_fails_the_stream_after_the_good_ones_before_it(client: Client) -> None:
    items = images(3) + [np.zeros((1, 3, 5, 5), np.float32)] + images(3)
    received = []
    with pytest.raises(GradtapError) as info:
        for r in client.analyze_many("seed-convnet", items, ["relu_1"], Objective.sum()):
            received.append(r.metadata["item"])
    assert received == [0, 1, 2]
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == "items[3].inputs[0].shape"
    assert info.value.message.startswith("item 3: ")
    # The client and the server are fine afterwards.
    assert (
        len(list(client.analyze_many("seed-convnet", images(2), ["relu_1"], Objective.sum()))) == 2
    )


def test_every_item_must_name_the_same_model(address: str) -> None:
    from gradtap.client._request import many_requests

    from gradtap.v1 import gradtap_pb2 as pb
    from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

    flags = {
        "input_grads": False,
        "activations": False,
        "outputs": False,
        "param_grads": (),
        "digest": None,
        "precision": "full",
    }
    requests = list(
        many_requests(
            "seed-mlp", [np.zeros((1, 784), np.float32)], [], None, pb.AnalyzeManyOptions(), **flags
        )
    ) + list(many_requests("seed-convnet", images(1), [], None, pb.AnalyzeManyOptions(), **flags))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.AnalyzeMany(iter(requests), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "item 1:" in (info.value.details() or "")


def test_breaking_out_early_cancels_the_stream(client: Client) -> None:
    stream = client.analyze_many("seed-convnet", images(20), ["relu_1"], Objective.sum())
    for r in stream:
        if r.metadata["item"] == 1:
            break
    stream.close()
    assert (
        len(list(client.analyze_many("seed-convnet", images(2), ["relu_1"], Objective.sum()))) == 2
    )


def test_no_items_means_no_results_and_no_aggregate(client: Client) -> None:
    stream = client.analyze_many("seed-convnet", [], ["relu_1"], Objective.sum(), aggregate=True)
    assert list(stream) == [] and stream.aggregate is None


def test_the_asyncio_client_streams_the_same_results(address: str, client: Client) -> None:
    items = images(4, batch=2, seed=7)

    async def run() -> tuple[list[np.ndarray], Aggregate | None]:
        async with aio.Client(address, timeout=60) as c:
            stream = c.analyze_many(
                "seed-convnet",
                items,
                ["relu_1"],
                Objective.logit(1),
                aggregate=True,
                max_in_flight=2,
            )
            grads = [r.gradients["relu_1"] async for r in stream]
            return grads, stream.aggregate

    grads, aggregate = asyncio.run(run())
    sync = client.analyze_many(
        "seed-convnet", items, ["relu_1"], Objective.logit(1), aggregate=True
    )
    with pytest.raises(RuntimeError, match="after the last result"):
        sync.aggregate  # noqa: B018 - not iterated yet
    for a, r in zip(grads, list(sync), strict=True):
        np.testing.assert_allclose(a, r.gradients["relu_1"], rtol=RTOL)
    assert sync.aggregate is not None and aggregate is not None
    np.testing.assert_allclose(
        aggregate.mean_gradients["relu_1"],
        sync.aggregate.mean_gradients["relu_1"],
        rtol=RTOL,
    )


def test_the_asyncio_client_raises_a_bad_items_error(address: str) -> None:
    items = images(1) + [np.zeros((1, 3, 5, 5), np.float32)]

    async def run() -> list[int]:
        seen: list[int] = []
        async with aio.Client(address, timeout=60) as c:
            async for r in c.analyze_many("seed-convnet", items, ["relu_1"], Objective.sum()):
                seen.append(r.metadata["item"])
        return seen

    with pytest.raises(GradtapError) as info:
        asyncio.run(run())
    assert info.value.field == "items[1].inputs[0].shape"
