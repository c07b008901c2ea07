"""Every spelling the vocabulary replaced still works for one release: it warns with a
DeprecationWarning pointing at the caller's line, and gives the same numbers as the new one."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from gradtap.client import AttributionResult, Client, Objective, aio


def image(seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 28, 28)).astype(np.float32)


@contextmanager
def deprecated(match: str) -> Iterator[None]:
    """Expects a DeprecationWarning matching `match`, raised at a line of this file."""
    with pytest.warns(DeprecationWarning, match=match) as record:
        yield
    assert all(w.filename == __file__ for w in record), [w.filename for w in record]


@contextmanager
def current() -> Iterator[None]:
    """The new spellings do not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        yield


def test_analyze_input_grad_is_input_grads(client: Client) -> None:
    x, objective = image(1), Objective.logit(3)
    with current():
        new = client.analyze("seed-convnet", x, ["relu_1"], objective, input_grads=True)
    with deprecated("input_grad= is deprecated; use input_grads="):
        old = client.analyze("seed-convnet", x, ["relu_1"], objective, input_grad=True)
    np.testing.assert_array_equal(old.input_grads[0], new.input_grads[0])
    with pytest.raises(TypeError, match="both input_grad= and input_grads="):
        client.analyze("seed-convnet", x, objective=objective, input_grad=True, input_grads=True)


def test_analyze_many_input_grad_and_batches(client: Client) -> None:
    items, objective = [image(2), image(3)], Objective.sum()
    with current():
        new = list(
            client.analyze_many("seed-convnet", items, "relu_1", objective, input_grads=True)
        )
    with deprecated("analyze_many\\(\\): (input_grad|batches)= is deprecated"):
        old = list(
            client.analyze_many(
                "seed-convnet",
                batches=items,
                targets="relu_1",
                objective=objective,
                input_grad=True,
            )
        )
    for a, b in zip(old, new, strict=True):
        np.testing.assert_array_equal(a.input_grads[0], b.input_grads[0])


def test_aio_analyze_input_grad_is_input_grads(address: str) -> None:
    x, objective = image(4), Objective.logit(1)

    async def run() -> tuple[np.ndarray, np.ndarray]:
        async with aio.Client(address, timeout=60) as c:
            with current():
                new = await c.analyze("seed-convnet", x, objective=objective, input_grads=True)
            with deprecated("input_grad= is deprecated"):
                old = await c.analyze("seed-convnet", x, objective=objective, input_grad=True)
        return old.input_grads[0], new.input_grads[0]

    old, new = asyncio.run(run())
    np.testing.assert_array_equal(old, new)


def test_attribute_index_and_node_by_position(client: Client) -> None:
    x = image(5)
    with current():
        new = client.attribute("seed-convnet", x, "layer_grad_cam", index=[3, 1], node="conv2")
    with deprecated("by position are deprecated; use index= and node="):
        old = client.attribute("seed-convnet", x, "layer_grad_cam", [3, 1], "conv2")
    np.testing.assert_array_equal(old.attribution, new.attribution)
    with deprecated("by position are deprecated"):
        only_index = client.attribute("seed-convnet", x, "saliency", [3, 1])
    with current():
        saliency = client.attribute("seed-convnet", x, "saliency", index=[3, 1])
    np.testing.assert_array_equal(only_index.attribution, saliency.attribution)


def test_attribute_target_and_layer_keywords(client: Client) -> None:
    x = image(6)
    with current():
        new = client.attribute(
            model="seed-convnet", inputs=x, method="layer_grad_cam", index=2, node="relu_1"
        )
    with deprecated("(target|layer)= is deprecated; use (index|node)="):
        old = client.attribute("seed-convnet", x, "layer_grad_cam", target=2, layer="relu_1")
    np.testing.assert_array_equal(old.attribution, new.attribution)
    with pytest.raises(TypeError, match="multiple values for argument 'index'"):
        client.attribute("seed-convnet", x, "saliency", 2, index=2)


def test_attribute_method_keyword_is_the_integration_rule(client: Client) -> None:
    x = image(7, batch=1)
    with current():
        new = client.attribute(
            "seed-convnet",
            x,
            "integrated_gradients",
            index=3,
            n_steps=6,
            integration_method="riemann_left",
        )
    with deprecated("method= is deprecated; use integration_method="):
        old = client.attribute(
            "seed-convnet", x, "integrated_gradients", index=3, n_steps=6, method="riemann_left"
        )
    np.testing.assert_array_equal(old.attribution, new.attribution)
    with current():
        gauss = client.attribute("seed-convnet", x, "integrated_gradients", index=3, n_steps=6)
    assert not np.allclose(gauss.attribution, new.attribution)  # the rule did travel


def test_aio_attribute_old_forms(address: str, client: Client) -> None:
    x = image(8)
    expected = client.attribute("seed-convnet", x, "layer_grad_cam", index=2, node="conv2")

    async def run() -> AttributionResult:
        async with aio.Client(address, timeout=60) as c:
            with deprecated("by position are deprecated"):
                return await c.attribute("seed-convnet", x, "layer_grad_cam", 2, "conv2")

    np.testing.assert_array_equal(asyncio.run(run()).attribution, expected.attribution)


ARRAY_USES: dict[str, Callable[[Any], Any]] = {
    "shape": lambda a: a.shape,
    "dtype": lambda a: a.dtype,
    "index": lambda a: a[0],
    "slice": lambda a: a[:, 1],
    "asarray": np.asarray,
    "times": lambda a: a * 2,
    "right minus": lambda a: 1.0 - a,
    "abs": np.abs,
    "sum method": lambda a: a.sum(),
    "len": len,
    "list": lambda a: [row.shape for row in a],
    "allclose": lambda a: np.allclose(a, a),
}


@pytest.mark.parametrize("use", ARRAY_USES, ids=str)
def test_the_attribution_result_works_as_the_array_it_replaced(client: Client, use: str) -> None:
    result = client.attribute("seed-convnet", image(9), "saliency", index=[1, 2])
    with current():
        expected = ARRAY_USES[use](result.attribution)
    with deprecated("take the array from its .attribution"):
        got = ARRAY_USES[use](result)
    if isinstance(expected, np.ndarray):
        assert type(got) is np.ndarray
    np.testing.assert_array_equal(got, expected)


def test_mse_node_second_is_the_old_order(client: Client) -> None:
    x = np.random.default_rng(10).standard_normal((2, 784)).astype(np.float32)
    expected = np.zeros((2, 64), np.float32)
    with current():
        new = Objective.mse(expected, node="relu_1")
        also_new = Objective.mse(expected, 0, "relu_1")
    assert new.message == also_new.message
    with deprecated("mse\\(expected, node, output\\) is deprecated"):
        old = Objective.mse(expected, "relu_1")
    with deprecated("mse\\(expected, node, output\\) is deprecated"):
        old_with_output = Objective.mse(expected, "relu_1", 0)
    with deprecated("target= is deprecated; use expected="):
        old_keyword = Objective.mse(target=expected, node="relu_1")
    assert old.message == old_with_output.message == old_keyword.message == new.message
    a = client.analyze("seed-mlp", x, "relu_1", new, input_grads=True)
    b = client.analyze("seed-mlp", x, "relu_1", old, input_grads=True)
    np.testing.assert_array_equal(a.input_grads[0], b.input_grads[0])
    assert a.loss == b.loss


def test_perturb_without_a_method_is_fgsm(client: Client) -> None:
    x = np.random.default_rng(11).standard_normal((1, 784)).astype(np.float32)
    objective = Objective.logit(2)
    with current():
        new = client.perturb("seed-mlp", x, "fgsm", objective, epsilon=0.05)
    with deprecated("the method is required; pass method='fgsm'"):
        old = client.perturb("seed-mlp", x, objective=objective, epsilon=0.05)
    np.testing.assert_array_equal(old.adversarial, new.adversarial)


def test_perturb_total_ms_moved_under_timings(client: Client) -> None:
    x = np.random.default_rng(12).standard_normal((1, 784)).astype(np.float32)
    r = client.perturb("seed-mlp", x, "fgsm", Objective.logit(2), epsilon=0.05)
    with current():
        total = r.metadata["timings"]["total_ms"]
        assert "total_ms" not in dict(r.metadata)
    assert total > 0
    with deprecated('metadata\\["total_ms"\\] is deprecated'):
        assert r.metadata["total_ms"] == total
    with deprecated("is deprecated"):
        assert r.metadata.get("total_ms") == total
    with deprecated("is deprecated"):
        assert "total_ms" in r.metadata
    with current():
        assert r.metadata.get("no such key", 7) == 7
        assert "no such key" not in r.metadata
