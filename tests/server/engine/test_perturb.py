"""Adversarial loops through the server against Captum's FGSM and PGD and hand-written loops."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.robust import FGSM, PGD
from gradtap.client import Client, GradtapError, Objective, aio
from gradtap.server.engine.analysis import Engine
from gradtap.server.models.zoo import builtin_module

from .test_attribution import runnable_example

RTOL, ATOL = 1e-5, 1e-6


def close(remote: np.ndarray, local: torch.Tensor) -> None:
    np.testing.assert_allclose(remote, local.detach().numpy(), rtol=RTOL, atol=ATOL)


def logits(name: str) -> torch.nn.Module:
    """The seed model's logits as one tensor, for Captum."""
    model = builtin_module(name)

    class Logits(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return model(x)[0]  # type: ignore[no-any-return]

    return Logits()


def summed_cross_entropy(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Captum wants one loss per row; summed, its gradient is Objective.cross_entropy's."""
    return F.cross_entropy(out, labels, reduction="none")


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


LABELS = torch.tensor([3, 8])


@pytest.mark.parametrize("targeted", [False, True])
def test_fgsm_matches_captum(client: Client, targeted: bool) -> None:
    x = images()
    result = client.perturb(
        "seed-convnet",
        x.numpy(),
        "fgsm",
        Objective.cross_entropy(LABELS.numpy(), reduction="sum"),
        epsilon=0.03,
        targeted=targeted,
        clamp=(-1.5, 1.5),
    )
    attack = FGSM(logits("seed-convnet"), summed_cross_entropy, lower_bound=-1.5, upper_bound=1.5)
    close(result.adversarial, attack.perturb(x, 0.03, LABELS, targeted=targeted))
    assert len(result.losses) == 1 and result.objective_before == result.losses[0]
    moved_up = result.objective_after > result.objective_before
    assert moved_up != targeted


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_matches_captum(client: Client, norm: str) -> None:
    x = images(seed=1)
    epsilon = 0.1 if norm == "Linf" else 1.0
    result = client.perturb(
        "seed-convnet",
        x.numpy(),
        "pgd",
        Objective.cross_entropy(LABELS.numpy(), reduction="sum"),
        epsilon=epsilon,
        step_size=0.02,
        steps=6,
        norm=norm,
        clamp=(-2.0, 2.0),
    )
    attack = PGD(logits("seed-convnet"), summed_cross_entropy, lower_bound=-2.0, upper_bound=2.0)
    local = attack.perturb(x, epsilon, 0.02, 6, LABELS, norm=norm)
    close(result.adversarial, local)
    assert len(result.losses) == 6
    assert result.objective_after > result.objective_before


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_random_start_draws_what_captum_draws_after_manual_seed(
    client: Client, norm: str
) -> None:
    x = images(batch=1, seed=2)
    label = LABELS[:1]
    result = client.perturb(
        "seed-convnet",
        x.numpy(),
        "pgd",
        Objective.cross_entropy(label.numpy()),
        epsilon=0.2,
        step_size=0.05,
        steps=3,
        norm=norm,
        random_start=True,
        seed=17,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(17)
        local = PGD(logits("seed-convnet"), summed_cross_entropy).perturb(
            x, 0.2, 0.05, 3, label, norm=norm, random_start=True
        )
    close(result.adversarial, local)
    assert result.metadata["seed"] == 17
    again = client.perturb(
        "seed-convnet",
        x.numpy(),
        "pgd",
        Objective.cross_entropy(label.numpy()),
        epsilon=0.2,
        step_size=0.05,
        steps=3,
        norm=norm,
        random_start=True,
        seed=17,
    )
    np.testing.assert_array_equal(again.adversarial, result.adversarial)


def test_fgsm_at_an_intermediate_node_is_the_seeds_adversarial_example(client: Client) -> None:
    # The seed's third example: the MSE between relu_1 and a target activation, with the
    # input pushed by epsilon along the sign of its gradient.
    torch.manual_seed(2)
    model = builtin_module("seed-mlp")
    input_image = torch.randn(1, 784, requires_grad=True)
    _, intermediate_layer = model(input_image)
    target_activation = torch.zeros_like(intermediate_layer)
    target_activation[0, 10] = 1
    attack_loss = F.mse_loss(intermediate_layer, target_activation)
    attack_loss.backward()
    epsilon = 0.01
    assert input_image.grad is not None
    adversarial = input_image + epsilon * input_image.grad.sign()

    result = client.perturb(
        "seed-mlp",
        input_image.detach().numpy(),
        "fgsm",
        Objective.mse(target_activation.numpy(), node="relu_1"),
        epsilon=epsilon,
        zero_threshold=0.0,
    )
    close(result.adversarial, adversarial)
    np.testing.assert_allclose(result.objective_before, attack_loss.item(), rtol=1e-6)
    _, moved = model(torch.from_numpy(result.adversarial))
    after = F.mse_loss(moved, target_activation).item()
    np.testing.assert_allclose(result.objective_after, after, rtol=1e-6)


def test_pgd_at_an_intermediate_node_matches_a_hand_written_loop(client: Client) -> None:
    model = builtin_module("seed-mlp")
    x0 = torch.randn(2, 784, generator=torch.Generator().manual_seed(4))
    target = torch.zeros(2, 64)
    target[:, 10] = 1
    epsilon, alpha, steps = 0.05, 0.01, 5

    x, losses = x0.clone(), []
    for _ in range(steps):
        x.requires_grad_(True)
        loss = F.mse_loss(model(x)[1], target)
        (grad,) = torch.autograd.grad(loss, x)
        losses.append(loss.item())
        with torch.no_grad():  # targeted: descend toward the target activation
            stepped = torch.where(grad.abs() > 1e-6, x - alpha * grad.sign(), x)
            x = (x0 + (stepped - x0).clamp(-epsilon, epsilon)).clamp(-3, 3)

    seen: list[tuple[int, float]] = []
    result = client.perturb(
        "seed-mlp",
        x0.numpy(),
        "pgd",
        Objective.mse(target.numpy(), node="relu_1"),
        epsilon=epsilon,
        step_size=alpha,
        steps=steps,
        targeted=True,
        clamp=(-3, 3),
        on_step=lambda step, loss: seen.append((step, loss)),
    )
    close(result.adversarial, x)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-6)
    assert seen == list(enumerate(result.losses))
    assert result.objective_after < result.objective_before


def test_mask_keeps_masked_elements_in_place(client: Client) -> None:
    x = images(batch=1, seed=3).numpy()
    mask = np.zeros_like(x)
    mask[..., :14] = 1
    result = client.perturb(
        "seed-convnet",
        x,
        "pgd",
        Objective.logit(2),
        epsilon=0.1,
        step_size=0.05,
        steps=3,
        mask=mask,
    )
    np.testing.assert_array_equal(result.adversarial[..., 14:], x[..., 14:])
    assert np.abs(result.adversarial[..., :14] - x[..., :14]).max() > 0


def test_progress_streams_while_the_loop_runs(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server (in this process) holds its third step until the client has seen the
    # first: that only finishes if progress is sent while the loop runs, not at its end.
    seen_first = threading.Event()
    waited: list[bool] = []
    analyze = Engine.analyze
    calls: list[int] = []

    def held(self: Engine, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            waited.append(seen_first.wait(timeout=20))
        return analyze(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "analyze", held)
    x = torch.randn(1, 784, generator=torch.Generator().manual_seed(5)).numpy()
    result = client.perturb(
        "seed-mlp",
        x,
        "pgd",
        Objective.logit(1),
        epsilon=0.5,
        step_size=0.01,
        steps=5,
        on_step=lambda step, loss: seen_first.set() if step == 0 else None,
    )
    assert waited == [True] and len(result.losses) == 5


def test_aio_perturb_awaits_an_async_on_step(address: str) -> None:
    x = images(batch=1).numpy()
    seen: list[float] = []

    async def on_step(step: int, loss: float) -> None:
        seen.append(loss)

    async def run() -> list[float]:
        async with aio.Client(address, timeout=60) as c:
            result = await c.perturb(
                "seed-convnet",
                x,
                "pgd",
                Objective.cross_entropy([3]),
                epsilon=0.05,
                step_size=0.01,
                steps=3,
                on_step=on_step,
            )
            return result.losses

    assert asyncio.run(run()) == seen and len(seen) == 3


@pytest.mark.parametrize(
    ("method", "kwargs", "field"),
    [
        ("fgsm", {"epsilon": -0.1}, "epsilon"),
        ("fgsm", {"epsilon": 0.1, "step_size": 0.1}, "step_size"),
        ("fgsm", {"epsilon": 0.1, "steps": 3}, "steps"),
        ("pgd", {"epsilon": 0.1, "step_size": 0.01}, "steps"),
        ("pgd", {"epsilon": 0.1, "step_size": 0.01, "steps": 1001}, "steps"),
        ("pgd", {"epsilon": 0.1, "steps": 2, "clamp": (1.0, 0.0)}, "lower_bound"),
        ("pgd", {"epsilon": 0.1, "steps": 2, "seed": 3}, "seed"),
        ("pgd", {"epsilon": 0.1, "steps": 2, "mask": np.ones((1, 3))}, "mask.shape"),
    ],
)
def test_bad_loops_are_invalid_argument_naming_the_field(
    client: Client, method: str, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(GradtapError) as info:
        client.perturb(
            "seed-convnet",
            images(batch=1).numpy(),
            method,
            Objective.cross_entropy([1]),
            **kwargs,  # type: ignore[arg-type]
        )
    assert info.value.code.name == "INVALID_ARGUMENT"
    assert info.value.field == field


def test_objective_errors_name_the_objective_field(client: Client, address: str) -> None:
    import grpc
    from gradtap.client._errors import from_rpc_error

    from gradtap.v1 import gradtap_pb2 as pb
    from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

    x = torch.randn(1, 784).numpy()
    # The client refuses a call without an objective before sending it; the server, sent
    # one anyway, names the field.
    request = pb.PerturbRequest(
        model=pb.Model(name="seed-mlp"),
        inputs=[pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=x.shape, data=x.tobytes())],
        method=pb.PERTURB_METHOD_FGSM,
        epsilon=0.1,
    )
    with grpc.insecure_channel(address) as channel, pytest.raises(GradtapError) as info:
        try:
            list(pb_grpc.GradientServiceStub(channel).Perturb(request, timeout=30))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
    assert info.value.field == "objective"
    with pytest.raises(GradtapError) as info:
        client.perturb(
            "seed-mlp", x, "fgsm", Objective.mse(np.zeros((1, 64)), node="nope"), epsilon=0.1
        )
    assert info.value.field == "objective.mse.site.node"


def test_the_docs_example_runs_and_agrees_with_captum(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADTAP_ADDRESS", address)
    code = compile(runnable_example("adversarial.md"), "docs/adversarial.md", "exec")
    with torch.random.fork_rng(devices=[]):
        exec(code, {"__name__": "docs_example"})


def test_a_cancelled_loop_stops_between_steps() -> None:
    from gradtap.server.engine.adversarial import Perturbation, Step, perturb
    from gradtap.server.engine.objectives import Objective as EngineObjective
    from gradtap.server.errors import Cancelled
    from gradtap.server.models.model import prepare
    from gradtap.server.models.zoo import export_builtin

    device = torch.device("cpu")
    model = prepare("seed-mlp", "builtin", export_builtin("seed-mlp"), device)
    steps: list[int] = []
    loop = perturb(
        Engine(device),
        model,
        Perturbation(
            inputs=[torch.randn(1, 784)],
            objective=EngineObjective("logit", index=(1,)),
            method="pgd",
            epsilon=0.1,
            step_size=0.01,
            steps=100,
        ),
        should_stop=lambda: len(steps) >= 3,
    )
    with pytest.raises(Cancelled):
        for event in loop:
            assert isinstance(event, Step)
            steps.append(event.step)
    assert steps == [0, 1, 2]
