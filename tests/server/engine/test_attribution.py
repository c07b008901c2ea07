"""Attribution through the server against Captum's own result for the same model and input."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from captum.attr import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerConductance,
    LayerGradCam,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    NoiseTunnel,
    Saliency,
)
from gradtap.client import Client, GradtapError
from gradtap.server.engine import attribution
from gradtap.server.engine.attribution import Attribution
from gradtap.server.engine.captum_bridge import ModelForward, rewritten_graph
from gradtap.server.errors import Cancelled
from gradtap.server.models.model import prepare
from gradtap.server.models.zoo import SeedConvNet, SeedMLP, builtin_module, export_builtin
from torch import nn

from ... import models
from ...conftest import Served

RTOL, ATOL = 1e-4, 1e-7


def close(remote: np.ndarray, local: torch.Tensor) -> None:
    np.testing.assert_allclose(remote, local.detach().numpy(), rtol=RTOL, atol=ATOL)


class FirstOutput(nn.Module):
    """Captum needs a forward returning one tensor; the seed models return (logits, hidden)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.module(*args)
        return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


class ConvNetReLU(SeedConvNet):
    """seed-convnet with nn.ReLU modules: Captum can hook them (guided backprop, layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.relu1(self.conv1(x))
        intermediate = self.relu2(self.conv2(x))
        return self.fc(intermediate.view(x.size(0), -1)), intermediate


class MLPReLU(SeedMLP):
    """seed-mlp with nn.ReLU modules."""

    def __init__(self) -> None:
        super().__init__()
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        intermediate = self.relu2(self.fc2(self.relu1(self.fc1(x))))
        return self.fc3(intermediate), intermediate


class EncoderTap(nn.Module):
    """seed-encoder with an identity at `modified_z` (graph node `mul`), for Captum to hook."""

    def __init__(self) -> None:
        super().__init__()
        seed = builtin_module("seed-encoder")
        self.encoder, self.decoder = seed.encoder, seed.decoder
        self.tap = nn.Identity()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        modified_z = self.tap(self.encoder(image).mean(dim=[2, 3]) * 2)
        return self.decoder(modified_z)  # type: ignore[no-any-return]


def twin(cls: type[nn.Module], name: str) -> FirstOutput:
    """An in-process twin of a seed model, with the served weights."""
    module = cls().eval()
    module.load_state_dict(builtin_module(name).state_dict())
    return FirstOutput(module)


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


# -- input methods ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_abs", [True, False])
def test_saliency_matches_captum(client: Client, use_abs: bool) -> None:
    x, f = images(), twin(ConvNetReLU, "seed-convnet")
    remote = client.attribute(
        "seed-convnet", x.numpy(), "saliency", index=[1, 7], abs=use_abs
    ).attribution
    close(remote, Saliency(f).attribute(x, target=[1, 7], abs=use_abs))


def test_input_x_gradient_matches_captum(client: Client) -> None:
    x = torch.randn(2, 784, generator=torch.Generator().manual_seed(1))
    f = twin(MLPReLU, "seed-mlp")
    remote = client.attribute("seed-mlp", x.numpy(), "input_x_gradient", index=4).attribution
    close(remote, InputXGradient(f).attribute(x, target=4))


def test_integrated_gradients_matches_captum_with_baselines_and_rule(client: Client) -> None:
    x, f = images(), twin(ConvNetReLU, "seed-convnet")
    baselines = torch.full((1, 3, 28, 28), 0.25)
    remote = client.attribute(
        "seed-convnet",
        x.numpy(),
        "integrated_gradients",
        index=[2, 5],
        n_steps=12,
        integration_method="riemann_trapezoid",
        baselines=baselines.numpy(),
    ).attribution
    local = IntegratedGradients(f).attribute(
        x, baselines=baselines, target=[2, 5], n_steps=12, method="riemann_trapezoid"
    )
    close(remote, local)


def test_integrated_gradients_batched_steps_give_captums_unbatched_numbers(
    client: Client,
) -> None:
    x, f = images(), twin(ConvNetReLU, "seed-convnet")
    remote = client.attribute(
        "seed-convnet",
        x.numpy(),
        "integrated_gradients",
        index=3,
        n_steps=10,
        internal_batch_size=6,
    ).attribution
    close(remote, IntegratedGradients(f).attribute(x, target=3, n_steps=10))


def test_large_n_steps_are_batched_within_the_activation_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = prepare("seed-convnet", "builtin", export_builtin("seed-convnet"), torch.device("cpu"))
    row = attribution._row_bytes(model)
    monkeypatch.setattr(attribution, "ACTIVATION_BUDGET_BYTES", 2 * row * 8)  # 8 rows a pass
    rows_seen: list[int] = []
    forward = ModelForward.forward

    def counting(self: ModelForward, *args: torch.Tensor) -> torch.Tensor:
        rows_seen.append(args[0].shape[0])
        return forward(self, *args)

    monkeypatch.setattr(ModelForward, "forward", counting)
    x = images(batch=1)
    done = attribution.attribute(
        torch.device("cpu"),
        model,
        Attribution([x], "integrated_gradients", (3,), params={"n_steps": 40}),
    )
    assert done.internal_batch_size == 8
    assert max(rows_seen) == 8 and sum(rows_seen) == 40
    f = twin(ConvNetReLU, "seed-convnet")
    close(done.tensor.numpy(), IntegratedGradients(f).attribute(x, target=3, n_steps=40))


def test_guided_backprop_matches_captum_on_a_twin_with_relu_modules(client: Client) -> None:
    # The seed models call F.relu, which Captum's GuidedBackprop cannot see; the server
    # guides every ReLU of the graph, which is what Captum does for nn.ReLU modules.
    x, f = images(), twin(ConvNetReLU, "seed-convnet")
    remote = client.attribute(
        "seed-convnet", x.numpy(), "guided_backprop", index=[0, 9]
    ).attribution
    close(remote, GuidedBackprop(f).attribute(x, target=[0, 9]))
    plain = client.attribute("seed-convnet", x.numpy(), "saliency", index=[0, 9], abs=False)
    assert not np.allclose(remote, plain.attribution, rtol=1e-2)


def test_guided_backprop_matches_captum_on_the_mlp(client: Client) -> None:
    x = torch.randn(2, 784, generator=torch.Generator().manual_seed(2))
    remote = client.attribute("seed-mlp", x.numpy(), "guided_backprop", index=6).attribution
    close(remote, GuidedBackprop(twin(MLPReLU, "seed-mlp")).attribute(x, target=6))


# -- smoothgrad -------------------------------------------------------------------------------


def test_smoothgrad_is_reproducible_for_a_seed(client: Client) -> None:
    x = images(batch=1).numpy()
    args: dict[str, Any] = {"nt_samples": 4, "stdevs": 0.2}
    a = client.attribute("seed-convnet", x, "smoothgrad", index=3, seed=11, **args).attribution
    b = client.attribute("seed-convnet", x, "smoothgrad", index=3, seed=11, **args).attribution
    c = client.attribute("seed-convnet", x, "smoothgrad", index=3, seed=12, **args).attribution
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_smoothgrad_draws_the_noise_captum_draws_after_manual_seed(client: Client) -> None:
    x, f = images(), twin(ConvNetReLU, "seed-convnet")
    remote = client.attribute(
        "seed-convnet",
        x.numpy(),
        "smoothgrad",
        index=[4, 1],
        nt_samples=5,
        nt_samples_batch_size=2,
        stdevs=0.3,
        seed=7,
    ).attribution
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        local = NoiseTunnel(Saliency(f)).attribute(
            x,
            nt_type="smoothgrad",
            nt_samples=5,
            nt_samples_batch_size=2,
            stdevs=0.3,
            target=[4, 1],
        )
    close(remote, local)


def test_smoothgrad_converges_to_saliency_averaged_over_noise(client: Client) -> None:
    x = torch.randn(1, 784, generator=torch.Generator().manual_seed(3))
    f, stdev = twin(MLPReLU, "seed-mlp"), 0.5
    noise = torch.randn(8192, 784, generator=torch.Generator().manual_seed(99)) * stdev
    noisy = (x + noise).requires_grad_(True)
    f(noisy)[:, 2].sum().backward()
    assert noisy.grad is not None
    expected = noisy.grad.abs().mean(dim=0, keepdim=True).numpy()

    def error(samples: int) -> float:
        sg = client.attribute(
            "seed-mlp", x.numpy(), "smoothgrad", index=2, nt_samples=samples, stdevs=stdev, seed=5
        ).attribution
        return float(np.linalg.norm(sg - expected) / np.linalg.norm(expected))

    few, many = error(4), error(512)
    assert many < few / 4
    assert many < 0.1


# -- layer methods ----------------------------------------------------------------------------


def test_layer_gradient_x_activation_at_a_module_path_matches_captum(client: Client) -> None:
    x = images()
    f = twin(ConvNetReLU, "seed-convnet")
    remote = client.attribute(
        "seed-convnet", x.numpy(), "layer_gradient_x_activation", index=[3, 8], node="conv2"
    ).attribution
    module = f.module
    assert isinstance(module, ConvNetReLU)
    close(remote, LayerGradientXActivation(f, module.conv2).attribute(x, target=[3, 8]))


def test_layer_grad_cam_at_a_graph_node_matches_captum(client: Client) -> None:
    x = images()
    f = twin(ConvNetReLU, "seed-convnet")
    module = f.module
    assert isinstance(module, ConvNetReLU)
    remote = client.attribute(
        "seed-convnet", x.numpy(), "layer_grad_cam", index=5, node="relu_1", relu_attributions=True
    ).attribution
    local = LayerGradCam(f, module.relu2).attribute(x, target=5, relu_attributions=True)
    assert remote.shape == (2, 1, 24, 24)
    close(remote, local)


def test_layer_integrated_gradients_at_a_node_without_a_module_matches_captum(
    client: Client,
) -> None:
    # `mul` is modified_z = latent_z.mean(dim=[2, 3]) * 2: a graph node, not a module.
    x = images(seed=4)
    tapped = EncoderTap().eval()
    remote = client.attribute(
        "seed-encoder",
        x.numpy(),
        "layer_integrated_gradients",
        index=[1, 6],
        node="mul",
        n_steps=16,
    ).attribution
    local = LayerIntegratedGradients(tapped, tapped.tap).attribute(x, target=[1, 6], n_steps=16)
    close(remote, local)


def test_layer_conductance_matches_captum(client: Client) -> None:
    x = images(batch=1, seed=5)
    f = twin(ConvNetReLU, "seed-convnet")
    module = f.module
    assert isinstance(module, ConvNetReLU)
    remote = client.attribute(
        "seed-convnet", x.numpy(), "layer_conductance", index=2, node="conv1", n_steps=8
    ).attribution
    close(remote, LayerConductance(f, module.conv1).attribute(x, target=2, n_steps=8))


def test_layer_integrated_gradients_on_a_resnet_block_matches_captum(
    client: Client, served: Served
) -> None:
    module = served.modules["resblock"]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    remote = client.attribute(
        "resblock", x.numpy(), "layer_integrated_gradients", index=[0, 4], node="bn1", n_steps=8
    ).attribution
    assert isinstance(module, models.ResBlock)
    local = LayerIntegratedGradients(module, module.bn1).attribute(x, target=[0, 4], n_steps=8)
    close(remote, local)


def test_token_model_layer_methods_hold_ids_and_masks_as_captum_does(
    client: Client, served: Served
) -> None:
    module = served.modules["tokens"]
    assert isinstance(module, models.TokenClassifier)
    ids, mask = models.token_inputs()
    inputs = [ids.numpy(), mask.numpy()]
    remote = client.attribute(
        "tokens", inputs, "layer_gradient_x_activation", index=1, node="embed"
    ).attribution
    close(remote, LayerGradientXActivation(module, module.embed).attribute((ids, mask), target=1))
    pad = torch.zeros_like(ids)
    remote = client.attribute(
        "tokens",
        inputs,
        "layer_integrated_gradients",
        index=[0, 1, 3],
        node="embed",
        baselines=pad.numpy(),
        n_steps=8,
    ).attribution
    local = LayerIntegratedGradients(module, module.embed).attribute(
        ids, baselines=pad, additional_forward_args=(mask,), target=[0, 1, 3], n_steps=8
    )
    close(remote, local)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kwargs", "field", "reason"),
    [
        ("integrated_gradients", {"n_steps": 0}, "params.n_steps", "OUT_OF_RANGE"),
        ("integrated_gradients", {"n_steps": 100_000}, "params.n_steps", "OUT_OF_RANGE"),
        ("integrated_gradients", {"internal_batch_size": 0}, "params.internal_batch_size", None),
        ("integrated_gradients", {"nt_samples": 3}, "params.nt_samples", "BAD_PARAMETER"),
        ("smoothgrad", {"nt_samples": 5000}, "params.nt_samples", "OUT_OF_RANGE"),
        ("smoothgrad", {"stdevs": -1.0}, "params.stdevs", "OUT_OF_RANGE"),
        ("saliency", {"node": "conv2"}, "node", "BAD_PARAMETER"),
        ("layer_grad_cam", {}, "node", "LAYER_REQUIRED"),
        ("layer_grad_cam", {"node": "nope"}, "node", "UNKNOWN_TARGET"),
        ("saliency", {"index": 10}, "index", "OUT_OF_RANGE"),
        ("saliency", {"index": [1, 2, 3]}, "index", "BAD_TARGET"),
        ("saliency", {"index": None}, "index", "TARGET_REQUIRED"),
        ("saliency", {"output": 5}, "output", "UNKNOWN_OUTPUT"),
        (
            "integrated_gradients",
            {"baselines": np.zeros((3, 28, 28), np.float32)},
            "params.baselines.shape",
            "WRONG_SHAPE",
        ),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(
    client: Client, method: str, kwargs: dict[str, Any], field: str, reason: str | None
) -> None:
    kwargs = {"index": 1, **kwargs}
    with pytest.raises(GradtapError) as info:
        client.attribute("seed-convnet", images().numpy(), method, **kwargs)
    assert info.value.code.name == "INVALID_ARGUMENT"
    assert info.value.field == field
    if reason is not None:
        assert info.value.reason == reason


def test_input_methods_on_a_token_model_name_the_inputs(client: Client) -> None:
    ids, mask = models.token_inputs()
    with pytest.raises(GradtapError) as info:
        client.attribute("tokens", [ids.numpy(), mask.numpy()], "saliency", index=1)
    assert info.value.field == "inputs" and info.value.reason == "NEEDS_ONE_FLOAT_INPUT"


def test_unknown_names_fail_in_the_client() -> None:
    with Client("127.0.0.1:1") as c:
        with pytest.raises(ValueError, match="unknown method"):
            c.attribute("seed-convnet", images().numpy(), "deeplift", index=1)
        with pytest.raises(TypeError, match="n_stepz"):
            c.attribute(
                "seed-convnet", images().numpy(), "integrated_gradients", index=1, n_stepz=3
            )  # type: ignore[call-arg]


def test_a_cancelled_attribution_stops_and_leaves_no_hook_behind() -> None:
    model = prepare("seed-convnet", "builtin", export_builtin("seed-convnet"), torch.device("cpu"))
    calls: list[int] = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    forward = ModelForward(
        rewritten_graph(model, 0, "conv2d_1"), [v for _, v, _ in model.state], [0], should_stop
    )
    method = LayerIntegratedGradients(forward, forward.layer)
    with pytest.raises(Cancelled):
        method.attribute(images(), target=1, n_steps=20, internal_batch_size=4)
    assert not forward.layer._forward_hooks and not forward.layer._forward_pre_hooks
    assert not forward.layer._backward_hooks


def test_the_rewritten_graph_computes_the_model(client: Client) -> None:
    model = prepare("seed-convnet", "builtin", export_builtin("seed-convnet"), torch.device("cpu"))
    x = images()
    state = [v for _, v, _ in model.state]
    logits, hidden = builtin_module("seed-convnet")(x)
    for output, expected in ((0, logits), (1, hidden)):
        graph = rewritten_graph(model, output, "relu_1", guided=True)
        close(ModelForward(graph, state, [0])(x).detach().numpy(), expected)


# -- aio ---------------------------------------------------------------------------------------


def test_aio_attribute_matches_sync(client: Client, address: str) -> None:
    import asyncio

    from gradtap.client import aio

    x = images().numpy()

    async def run() -> np.ndarray:
        async with aio.Client(address, timeout=60) as c:
            r = await c.attribute("seed-convnet", x, "layer_grad_cam", index=2, node="conv2")
            return r.attribution

    np.testing.assert_array_equal(
        asyncio.run(run()),
        client.attribute("seed-convnet", x, "layer_grad_cam", index=2, node="conv2").attribution,
    )


def runnable_example(page: str) -> str:
    """The python block under a docs page's "A runnable example" heading."""
    text = (Path(__file__).resolve().parents[3] / "docs" / page).read_text()
    section = text.split("## A runnable example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, f"docs/{page} has no runnable example"
    return match.group(1)


def test_the_docs_example_runs_and_agrees_with_captum(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADTAP_ADDRESS", address)
    code = compile(runnable_example("attribution.md"), "docs/attribution.md", "exec")
    with torch.random.fork_rng(devices=[]):
        exec(code, {"__name__": "docs_example"})
