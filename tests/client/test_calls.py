"""How the calls take their arguments: single targets, wrong types refused before sending,
required arguments."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import numpy as np
import pytest
from gradtap.client import Client, Objective, Target, aio

NOWHERE = "127.0.0.1:1"
"""Nothing listens here: a call that reached the network would fail with UNAVAILABLE, so a
TypeError or ValueError proves the client refused the call before sending anything."""


def image(seed: int = 0, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 28, 28)).astype(np.float32)


@pytest.mark.parametrize("single", ["relu_1", Target("relu_1")], ids=["str", "Target"])
def test_a_single_target_works_where_a_list_works(
    client: Client, address: str, single: str | Target
) -> None:
    x, objective = image(1), Objective.logit(3)
    expected = client.analyze("seed-convnet", x, ["relu_1"], objective).gradients["relu_1"]
    np.testing.assert_array_equal(
        client.analyze("seed-convnet", x, single, objective).gradients["relu_1"], expected
    )
    [item] = client.analyze_many("seed-convnet", [x], single, objective)
    np.testing.assert_array_equal(item.gradients["relu_1"], expected)

    async def run() -> list[np.ndarray]:
        async with aio.Client(address, timeout=60) as c:
            one = await c.analyze("seed-convnet", x, single, objective)
            many = [r async for r in c.analyze_many("seed-convnet", [x], single, objective)]
        return [one.gradients["relu_1"], many[0].gradients["relu_1"]]

    for gradient in asyncio.run(run()):
        np.testing.assert_array_equal(gradient, expected)


def test_a_single_float32_target_is_converted_on_arrival(client: Client) -> None:
    target = Target("relu_1", dtype="bfloat16", as_float32=True)
    r = client.analyze("seed-convnet", image(2), target, Objective.logit(3))
    assert r.gradients["relu_1"].dtype == np.float32


WRONG_TARGETS: list[Any] = [3, [3], b"relu_1", ["relu_1", 2.5], {"relu_1": 1}]


@pytest.mark.parametrize("targets", WRONG_TARGETS, ids=repr)
def test_a_target_of_the_wrong_type_fails_before_anything_is_sent(targets: Any) -> None:
    with Client(NOWHERE, timeout=5, retries=0) as c:
        with pytest.raises(TypeError, match="target"):
            c.analyze("seed-convnet", image(), targets, Objective.sum())
        with pytest.raises(TypeError, match="target"):
            c.analyze_many("seed-convnet", [image()], targets, Objective.sum())

    async def run() -> None:
        async with aio.Client(NOWHERE, timeout=5, retries=0) as c:
            with pytest.raises(TypeError, match="target"):
                await c.analyze("seed-convnet", image(), targets, Objective.sum())
            with pytest.raises(TypeError, match="target"):
                c.analyze_many("seed-convnet", [image()], targets, Objective.sum())

    asyncio.run(run())


def test_perturb_without_an_objective_fails_before_anything_is_sent() -> None:
    with Client(NOWHERE, timeout=5, retries=0) as c:
        with pytest.raises(TypeError, match="objective"):
            c.perturb("seed-convnet", image(), "fgsm", None, epsilon=0.1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="objective"):
            c.perturb("seed-convnet", image(), "fgsm", epsilon=0.1)  # type: ignore[call-arg]

    async def run() -> None:
        async with aio.Client(NOWHERE, timeout=5, retries=0) as c:
            with pytest.raises(TypeError, match="objective"):
                await c.perturb("seed-convnet", image(), "fgsm", None, epsilon=0.1)  # type: ignore[arg-type]

    asyncio.run(run())


CALLS = ["list_models", "describe", "health", "analyze", "analyze_many", "attribute", "perturb"]
LEADING = {
    "describe": ["model"],
    "health": ["service"],
    "analyze": ["model", "inputs", "targets", "objective"],
    "analyze_many": ["model", "items", "targets", "objective"],
    "attribute": ["model", "inputs", "method"],
    "perturb": ["model", "inputs", "method", "objective"],
}


@pytest.mark.parametrize("name", CALLS)
def test_both_faces_take_one_calling_convention(name: str) -> None:
    sync, asyncio_ = getattr(Client, name), getattr(aio.Client, name)
    signature = inspect.signature(sync)
    assert signature.parameters == inspect.signature(asyncio_).parameters
    assert sync.__doc__ and sync.__doc__ == asyncio_.__doc__
    assert inspect.iscoroutinefunction(asyncio_) == (name != "analyze_many")
    (self, *parameters) = signature.parameters.values()
    assert self.kind is inspect.Parameter.POSITIONAL_ONLY  # self, and nothing else
    leading = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert leading == LEADING.get(name, [])
    others = [p for p in parameters if p.name not in leading]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in others)
    assert "timeout" in signature.parameters


def test_every_call_takes_its_arguments_by_name(client: Client) -> None:
    x = image(3)
    by_name = client.attribute(model="seed-convnet", inputs=x, method="saliency", index=1)
    by_position = client.attribute("seed-convnet", x, "saliency", index=1)
    np.testing.assert_array_equal(by_name.attribution, by_position.attribution)
    analyzed = client.analyze(
        model="seed-convnet", inputs=x, targets="relu_1", objective=Objective.logit(1)
    )
    assert analyzed.gradients["relu_1"].shape == (1, 64, 24, 24)


def test_attribute_returns_its_summary_in_the_metadata(client: Client) -> None:
    r = client.attribute(
        "seed-convnet", image(4), "integrated_gradients", index=2, n_steps=4, timeout=60
    )
    assert r.attribution.shape == (1, 3, 28, 28)
    meta = r.metadata
    assert meta["model"] == "seed-convnet" and meta["method"] == "integrated_gradients"
    assert meta["node"] is None
    assert meta["model_digest"] == client.describe("seed-convnet").digest
    assert meta["model_version"] == "1"  # the built-in models' one version
    assert meta["device"] == "cpu" and meta["torch_version"] and meta["captum_version"]
    assert meta["replica"] and meta["seed"] == 0 and meta["internal_batch_size"] >= 1
    assert set(meta["timings"]) == {"compute_ms", "total_ms"}
    assert 0 < meta["timings"]["compute_ms"] <= meta["timings"]["total_ms"]


def test_perturb_metadata_keeps_timings_as_every_result_does(client: Client) -> None:
    x = np.random.default_rng(5).standard_normal((1, 784)).astype(np.float32)
    r = client.perturb("seed-mlp", x, "fgsm", Objective.logit(1), epsilon=0.01)
    assert set(r.metadata) == {
        "model", "model_version", "method", "model_digest", "device", "torch_version",
        "replica", "seed", "timings",
    }  # fmt: skip
    assert r.metadata["model_version"] == "1"
    assert set(r.metadata["timings"]) == {"total_ms"}
