"""The asyncio client gives the same results and errors as the synchronous one."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from gradtap.client import Client, GradtapError, Objective, aio


def test_async_client_matches_sync_client(address: str, client: Client) -> None:
    x = np.random.default_rng(3).standard_normal((2, 3, 28, 28)).astype(np.float32)
    objective = Objective.cross_entropy([1, 2])
    expected = client.analyze("seed-convnet", x, ["relu_1"], objective, input_grads=True)

    async def run() -> tuple[aio.Result, list[str], str]:
        async with aio.Client(address, timeout=30) as c:
            r = await c.analyze("seed-convnet", x, ["relu_1"], objective, input_grads=True)
            names = [m.name for m in await c.list_models()]
            return r, names, await c.health()

    r, names, health = asyncio.run(run())
    np.testing.assert_array_equal(r.gradients["relu_1"], expected.gradients["relu_1"])
    np.testing.assert_array_equal(r.input_grads[0], expected.input_grads[0])
    assert r.loss == expected.loss
    assert "seed-convnet" in names and health == "SERVING"


def test_async_client_raises_gradtap_error_with_details(address: str) -> None:
    async def run() -> None:
        async with aio.Client(address, timeout=30) as c:
            await c.describe("no-such-model")

    with pytest.raises(GradtapError) as info:
        asyncio.run(run())
    assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.field == "model.name"


def test_async_result_stream_is_exported_and_closes_with_async_with(address: str) -> None:
    from gradtap.client import AsyncResultStream

    x = np.random.default_rng(4).standard_normal((1, 3, 28, 28)).astype(np.float32)

    async def run() -> tuple[int, int]:
        async with aio.Client(address, timeout=30) as c:
            async with c.analyze_many("seed-convnet", [x] * 5, ["relu_1"], Objective.sum()) as s:
                assert isinstance(s, AsyncResultStream)
                first = [r.metadata["item"] async for r in s]
            async with c.analyze_many("seed-convnet", [x] * 5, ["relu_1"], Objective.sum()) as s:
                async for _ in s:
                    break  # leaving the block cancels the rest of the stream
            return len(first), len([r async for r in c.analyze_many("seed-convnet", [x], "relu_1")])

    assert asyncio.run(run()) == (5, 1)
