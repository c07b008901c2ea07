"""Models exported by a user into a repository: same numbers as retain_grad() in-process."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from gradtap.client import Client, Objective

from ... import models
from ...conftest import Served

RTOL, ATOL = 1e-5, 1e-6


def close(a: np.ndarray, b: torch.Tensor) -> None:
    np.testing.assert_allclose(a, b.detach().numpy(), rtol=RTOL, atol=ATOL)


def test_repository_models_are_listed_with_digests(client: Client) -> None:
    listed = {m.name: m for m in client.list_models()}
    assert {"tokens", "resblock", "wide", "seed-convnet"} <= set(listed)
    assert listed["tokens"].source == "repository" and listed["seed-mlp"].source == "builtin"
    assert all(m.digest.startswith("sha256:") and len(m.digest) == 71 for m in listed.values())


def test_describe_lists_nodes_modules_and_input_specs(client: Client) -> None:
    d = client.describe("tokens")
    assert [(s.dtype, s.shape) for s in d.inputs] == [("int64", (None, 7)), ("bool", (None, 7))]
    assert d.inputs[0].min_shape == (1, 7) and d.inputs[0].max_shape == (64, 7)
    assert d.modules["embed"] == "embedding" and "head" in d.modules
    names = {n.name: n for n in d.nodes}
    assert names["embedding"].differentiable and not names["ids"].differentiable
    assert names["embedding"].shape == (None, 7, 16)
    assert "embed.weight" in d.parameters


def test_token_embedding_gradient_matches_retain_grad(client: Client, served: Served) -> None:
    model = served.modules["tokens"]
    ids, mask = models.token_inputs(batch=2)
    embedded = model.embed(ids)
    embedded.retain_grad()
    h = torch.tanh(model.proj(embedded))
    h = (h * mask.unsqueeze(-1).to(h.dtype)).sum(dim=1) / mask.sum(dim=1, keepdim=True)
    logits = model.head(h)
    labels = torch.tensor([1, 3])
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    assert embedded.grad is not None

    r = client.analyze(
        "tokens",
        [ids.numpy(), mask.numpy()],
        targets=["embed"],
        objective=Objective.cross_entropy(labels.numpy()),
        input_grads=True,
        activations=True,
    )
    close(r.gradients["embed"], embedded.grad)
    close(r.activations["embed"], embedded)
    close(r.outputs[0], logits)
    assert r.input_grads == {}  # integer inputs have no gradient
    np.testing.assert_allclose(r.loss, loss.item(), rtol=RTOL)


def test_resblock_with_eval_batchnorm_matches_retain_grad(client: Client, served: Served) -> None:
    model = served.modules["resblock"]
    torch.manual_seed(4)
    x = torch.randn(3, 3, 16, 16, requires_grad=True)
    a = model.bn1(model.conv1(x))
    a.retain_grad()
    h = F.relu(a)
    b = model.bn2(model.conv2(h))
    b.retain_grad()
    out = model.fc(torch.flatten(model.pool(F.relu(h + b)), 1))
    out[:, 2].sum().backward()
    assert a.grad is not None and b.grad is not None and x.grad is not None

    r = client.analyze(
        "resblock", x.detach().numpy(), ["bn1", "bn2"], Objective.logit(2), input_grads=True
    )
    close(r.gradients["bn1"], a.grad)
    close(r.gradients["bn2"], b.grad)
    close(r.input_grads[0], x.grad)


def test_grad_outputs_is_a_vector_jacobian_product(client: Client, served: Served) -> None:
    model = served.modules["resblock"]
    torch.manual_seed(5)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    upstream = torch.randn(2, 5)
    (vjp,) = torch.autograd.grad(model(x), x, grad_outputs=upstream)
    r = client.analyze(
        "resblock",
        x.detach().numpy(),
        [],
        Objective.grad_outputs(upstream.numpy()),
        input_grads=True,
    )
    close(r.input_grads[0], vjp)


def test_per_row_logits_select_one_class_per_row(client: Client, served: Served) -> None:
    model = served.modules["resblock"]
    torch.manual_seed(6)
    x = torch.randn(3, 3, 16, 16, requires_grad=True)
    out = model(x)
    out[torch.arange(3), torch.tensor([4, 0, 2])].sum().backward()
    assert x.grad is not None
    r = client.analyze(
        "resblock", x.detach().numpy(), [], Objective.logit([4, 0, 2]), input_grads=True
    )
    close(r.input_grads[0], x.grad)


def test_results_larger_than_grpc_message_limit_come_back_whole(
    client: Client, served: Served
) -> None:
    model = served.modules["wide"]
    torch.manual_seed(7)
    x = torch.randn(1, 3, 128, 128, requires_grad=True)
    conv = model.conv(x)
    conv.retain_grad()
    out = torch.sigmoid(conv)
    out.sum().backward()
    assert conv.grad is not None and x.grad is not None
    r = client.analyze(
        "wide", x.detach().numpy(), ["conv"], Objective.sum(), activations=True, input_grads=True
    )
    assert r.gradients["conv"].nbytes > 4 << 20
    close(r.gradients["conv"], conv.grad)
    close(r.activations["conv"], conv)
    close(r.outputs[0], out)
    close(r.input_grads[0], x.grad)
    expected = 3 * conv.numel() * 4 + x.numel() * 4
    assert r.metadata["bytes_received"] == expected


def test_activation_only_requests_need_no_objective(client: Client, served: Served) -> None:
    model = served.modules["resblock"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model.conv1(x)
    r = client.analyze("resblock", x.numpy(), ["conv1"])
    close(r.activations["conv1"], expected)
    assert r.gradients == {} and np.isnan(r.loss)
