"""How the calls take their arguments: single targets, wrong types refused before sending,
required arguments."""

from __future__ import annotations

import asyncio
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
