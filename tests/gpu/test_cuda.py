"""The CUDA path, on a GPU: every objective served on the GPU gives what eager PyTorch gives
on the same GPU, results come back through pinned host copies, an out-of-memory call is
RESOURCE_EXHAUSTED and the server serves on, and the memory gauges read torch.

Skipped without CUDA; `make gpu-check` runs them (with bench/gpu_check.py) where there is one.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from gradtap.client import Client, GradtapError, Objective
from gradtap.server import Settings, start
from gradtap.server.models.zoo import builtin_module
from gradtap.server.rpc.app import Running
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RTOL, ATOL = 1e-4, 1e-5


class Blowup(nn.Module):
    """A small result from an intermediate far too big for any GPU (about 400 GB)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(100_000_000, 1).sum(dim=0, keepdim=True)


class Big(nn.Module):
    """A 64 MiB result: many chunks, each through a pinned host buffer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x).repeat(16_384, 1)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    repository: Path = tmp_path_factory.mktemp("cuda-models")
    for name, module in (("blowup", Blowup()), ("big", Big())):
        torch.export.save(torch.export.export(module, (torch.zeros(1, 1024),)),
                          repository / f"{name}.pt2")  # fmt: skip
    served = start(
        "127.0.0.1:0", Settings(device="cuda", model_repository=repository, metrics_port=0)
    )
    yield served
    served.drain(0)


@pytest.fixture
def client(running: Running) -> Iterator[Client]:
    with Client(f"127.0.0.1:{running.port}", timeout=120) as c:
        yield c


def _eager(model: str, x: torch.Tensor, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of relu_1 and of the input, eager on the GPU."""
    module = builtin_module(model).cuda()
    for p in module.parameters():
        p.requires_grad_(False)
    xi = x.cuda().requires_grad_(True)
    logits, hidden = module(xi)
    labels = torch.tensor([1, 3], device="cuda")
    scalars = {
        "sum": lambda: logits.sum(),
        "logit": lambda: logits[torch.arange(2), labels].sum(),
        "cross_entropy": lambda: nn.functional.cross_entropy(logits, labels),
        "mse": lambda: nn.functional.mse_loss(logits, torch.ones_like(logits)),
        "grad_outputs": lambda: (logits * torch.full_like(logits, 0.5)).sum(),
    }
    g_hidden, g_x = torch.autograd.grad(scalars[objective](), [hidden, xi])
    return g_hidden.cpu(), g_x.cpu()


OBJECTIVES = {
    "sum": Objective.sum(),
    "logit": Objective.logit([1, 3]),
    "cross_entropy": Objective.cross_entropy([1, 3]),
    "mse": Objective.mse(np.ones((2, 10), np.float32)),
    "grad_outputs": Objective.grad_outputs(np.full((2, 10), 0.5, np.float32)),
}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("model", ["seed-convnet", "seed-mlp"])
def test_every_objective_on_the_gpu_is_eager_pytorch_on_the_gpu(
    client: Client, model: str, objective: str
) -> None:
    shape = (2, 3, 28, 28) if model == "seed-convnet" else (2, 784)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    r = client.analyze(model, x.numpy(), ["relu_1"], OBJECTIVES[objective], input_grads=True)
    assert r.metadata["device"].startswith("cuda")
    g_hidden, g_x = _eager(model, x, objective)
    np.testing.assert_allclose(r.gradients["relu_1"], g_hidden.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(r.input_grads[0], g_x.numpy(), rtol=RTOL, atol=ATOL)


def test_a_big_result_comes_back_whole_through_pinned_copies(client: Client) -> None:
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(1))
    r = client.analyze("big", x.numpy(), outputs=True)
    assert r.outputs[0].shape == (16_384, 1024)
    np.testing.assert_allclose(r.outputs[0][-1], torch.sin(x)[0].numpy(), rtol=1e-6, atol=1e-6)


def test_out_of_memory_is_resource_exhausted_and_the_server_serves_on(client: Client) -> None:
    with pytest.raises(GradtapError) as info:
        client.analyze("blowup", np.ones((1, 1024), np.float32), outputs=True)
    assert info.value.code.name == "RESOURCE_EXHAUSTED"
    assert info.value.reason == "DEVICE_OUT_OF_MEMORY"
    x = np.ones((1, 784), np.float32)
    assert client.analyze("seed-mlp", x, ["relu_1"], Objective.sum()).gradients["relu_1"].shape == (
        1,
        64,
    )


def test_the_memory_gauges_read_torch_at_scrape_time(running: Running, client: Client) -> None:
    client.analyze("seed-mlp", np.ones((1, 784), np.float32), ["relu_1"], Objective.sum())
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    assert 'gradtap_cuda_memory_allocated_bytes{device="cuda:0"}' in text
    assert 'gradtap_cuda_memory_reserved_bytes{device="cuda:0"}' in text
