"""The seed's three retain_grad() examples, in-process and through the server: same numbers."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from gradtap.client import Client, Objective
from gradtap.server.models.zoo import builtin_module

RTOL, ATOL = 1e-5, 1e-7


def close(a: np.ndarray, b: torch.Tensor) -> None:
    np.testing.assert_allclose(a, b.detach().numpy(), rtol=RTOL, atol=ATOL)


def test_seed_encoder_modified_z_gradient_matches_retain_grad(client: Client) -> None:
    torch.manual_seed(0)
    image = torch.randn(1, 3, 28, 28, requires_grad=True)
    model = builtin_module("seed-encoder")
    latent_z = model.encoder(image)
    latent_z.retain_grad()
    modified_z = latent_z.mean(dim=[2, 3]) * 2
    modified_z.retain_grad()
    output = model.decoder(modified_z)
    loss = output.sum()
    loss.backward()

    r = client.analyze(
        "seed-encoder",
        image.detach().numpy(),
        targets=["mul", "encoder"],
        objective=Objective.sum(),
        input_grads=True,
        activations=True,
    )
    assert modified_z.grad is not None and latent_z.grad is not None and image.grad is not None
    close(r.gradients["mul"], modified_z.grad)
    close(r.activations["mul"], modified_z)
    close(r.gradients["encoder"], latent_z.grad)
    close(r.activations["encoder"], latent_z)
    close(r.input_grads[0], image.grad)
    close(r.outputs[0], output)
    np.testing.assert_allclose(r.loss, loss.item(), rtol=RTOL)


def test_seed_convnet_intermediate_gradient_matches_retain_grad(client: Client) -> None:
    torch.manual_seed(1)
    model = builtin_module("seed-convnet")
    image = torch.randn(1, 3, 28, 28, requires_grad=True)
    label = torch.randint(0, 10, (1,))
    output, intermediate_features = model(image)
    intermediate_features.retain_grad()
    loss = F.cross_entropy(output, label)
    loss.backward()

    r = client.analyze(
        "seed-convnet",
        image.detach().numpy(),
        targets=["relu_1", "conv2"],
        objective=Objective.cross_entropy(label.numpy()),
        input_grads=True,
        activations=True,
    )
    assert intermediate_features.grad is not None and image.grad is not None
    assert r.gradients["relu_1"].shape == (1, 64, 24, 24)
    close(r.gradients["relu_1"], intermediate_features.grad)
    close(r.activations["relu_1"], intermediate_features)
    close(r.input_grads[0], image.grad)
    close(r.outputs[0], output)
    close(r.outputs[1], intermediate_features)
    np.testing.assert_allclose(r.loss, loss.item(), rtol=RTOL)
    # conv2's output is relu_1's input: where the ReLU is active the gradients agree.
    active = r.activations["relu_1"] > 0
    np.testing.assert_allclose(r.gradients["conv2"][active], r.gradients["relu_1"][active])
    assert np.all(r.gradients["conv2"][~active] == 0)


def test_seed_mlp_adversarial_perturbation_matches_retain_grad(client: Client) -> None:
    torch.manual_seed(2)
    model = builtin_module("seed-mlp")
    input_image = torch.randn(1, 784, requires_grad=True)
    output, intermediate_layer = model(input_image)
    intermediate_layer.retain_grad()
    target_activation = torch.zeros_like(intermediate_layer)
    target_activation[0, 10] = 1
    attack_loss = F.mse_loss(intermediate_layer, target_activation)
    attack_loss.backward()
    epsilon = 0.01
    assert input_image.grad is not None and intermediate_layer.grad is not None
    perturbation = epsilon * input_image.grad.sign()

    r = client.analyze(
        "seed-mlp",
        input_image.detach().numpy(),
        targets=["relu_1"],
        objective=Objective.mse(target_activation.numpy(), node="relu_1"),
        input_grads=True,
    )
    close(r.gradients["relu_1"], intermediate_layer.grad)
    close(r.input_grads[0], input_image.grad)
    np.testing.assert_allclose(r.loss, attack_loss.item(), rtol=RTOL)
    remote = epsilon * np.sign(r.input_grads[0])
    assert remote.shape == (1, 784)
    decided = np.abs(input_image.grad.numpy()) > 1e-9
    np.testing.assert_array_equal(remote[decided], perturbation.numpy()[decided])
    adversarial = input_image.detach().numpy() + remote
    np.testing.assert_allclose(
        adversarial, (input_image + perturbation).detach().numpy(), atol=1e-7
    )


def test_batched_inputs_give_per_row_gradients(client: Client) -> None:
    torch.manual_seed(3)
    model = builtin_module("seed-convnet")
    image = torch.randn(4, 3, 28, 28, requires_grad=True)
    labels = torch.tensor([0, 3, 7, 9])
    output, intermediate = model(image)
    intermediate.retain_grad()
    F.cross_entropy(output, labels, reduction="sum").backward()
    r = client.analyze(
        "seed-convnet",
        image.detach().numpy(),
        targets=["relu_1"],
        objective=Objective.cross_entropy(labels.numpy(), reduction="sum"),
        input_grads=True,
    )
    assert intermediate.grad is not None and image.grad is not None
    close(r.gradients["relu_1"], intermediate.grad)
    close(r.input_grads[0], image.grad)
