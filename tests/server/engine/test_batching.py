"""Dynamic batching: merged concurrent requests get exactly their unbatched results."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from gradtap.client import Client, GradtapError, Objective, Result
from gradtap.server import Settings, start
from gradtap.server.engine.analysis import Analysis, Engine, Target
from gradtap.server.engine.batching import Batcher
from gradtap.server.engine.objectives import Objective as EngineObjective
from gradtap.server.errors import Cancelled, InvalidArgument
from gradtap.server.models.registry import Registry
from gradtap.server.models.zoo import export_builtin
from gradtap.server.rpc.app import Running
from torch import nn

from ... import models
from ...conftest import Served

RTOL, ATOL = 1e-5, 1e-6


class Centered(nn.Module):
    """Couples samples: each row is centred on the batch mean, so merging would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x - x.mean(dim=0, keepdim=True))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A batching server with a generous window, and a non-batching twin."""
    repository = tmp_path_factory.mktemp("batching")
    torch.export.save(export_builtin("seed-convnet"), repository / "convnet.pt2")
    batch = torch.export.Dim("batch", min=1, max=64)
    block = models.build(models.ResBlock)
    torch.export.save(
        torch.export.export(block, (torch.zeros(2, 3, 16, 16),), dynamic_shapes=({0: batch},)),
        repository / "resblock.pt2",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        centered = Centered().eval()
    torch.export.save(
        torch.export.export(centered, (torch.zeros(2, 8),), dynamic_shapes=({0: batch},)),
        repository / "centered.pt2",
    )
    common = {"device": "cpu", "builtins": False, "model_repository": repository, "max_workers": 32}
    # Admission lets only this many calls reach the batcher at once: all of them, here.
    common["max_concurrent_requests"] = 16
    batching = start("127.0.0.1:0", Settings(max_batch_size=16, batch_timeout_us=200_000, **common))  # type: ignore[arg-type]
    alone = start("127.0.0.1:0", Settings(max_batch_size=1, **common))  # type: ignore[arg-type]
    running: list[Running] = [batching, alone]
    yield f"127.0.0.1:{batching.port}", f"127.0.0.1:{alone.port}"
    for r in running:
        r.server.stop(None).wait()


def concurrently(calls: list[Callable[[], Result]]) -> list[Result | BaseException]:
    results: list[Result | BaseException] = [RuntimeError("not run")] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def requests(n: int, shape: tuple[int, ...], classes: int) -> list[tuple[np.ndarray, Objective]]:
    rng = np.random.default_rng(11)
    out = []
    for i in range(n):
        rows = 1 + i % 3
        x = rng.standard_normal((rows, *shape)).astype(np.float32)
        kinds = [
            Objective.cross_entropy(rng.integers(0, classes, rows)),
            Objective.logit(int(rng.integers(0, classes))),
            Objective.sum(),
            Objective.grad_outputs(rng.standard_normal((rows, classes)).astype(np.float32)),
        ]
        out.append((x, kinds[i % 4]))
    return out


@pytest.mark.parametrize(
    ("model", "shape", "targets"),
    [
        ("convnet", (3, 28, 28), ["relu_1", "conv2"]),
        ("resblock", (3, 16, 16), ["bn1", "bn2"]),
    ],
)
def test_merged_requests_equal_their_unbatched_results(
    servers: tuple[str, str], model: str, shape: tuple[int, ...], targets: list[str]
) -> None:
    batching, alone = servers
    # Eight calls of four objective kinds and 1-3 rows each; calls of a kind can merge.
    work = requests(8, shape, 10 if model == "convnet" else 5)
    with Client(batching, timeout=60) as b, Client(alone, timeout=60) as a:
        calls = [
            (lambda x=x, o=o: b.analyze(model, x, targets, o, input_grads=True, activations=True))
            for x, o in work
        ]
        merged = concurrently(calls)
        for (x, o), r in zip(work, merged):
            assert isinstance(r, Result), r
            expected = a.analyze(model, x, targets, o, input_grads=True, activations=True)
            assert expected.metadata["batch_size"] == 1
            for name in targets:
                np.testing.assert_allclose(
                    r.gradients[name], expected.gradients[name], rtol=RTOL, atol=ATOL
                )
                np.testing.assert_allclose(
                    r.activations[name], expected.activations[name], rtol=RTOL, atol=ATOL
                )
            np.testing.assert_allclose(
                r.input_grads[0], expected.input_grads[0], rtol=RTOL, atol=ATOL
            )
            np.testing.assert_allclose(r.outputs[0], expected.outputs[0], rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(r.loss, expected.loss, rtol=RTOL)
        assert max(r.metadata["batch_size"] for r in merged if isinstance(r, Result)) > 1


def test_a_bad_request_does_not_spoil_its_batch(servers: tuple[str, str]) -> None:
    batching, alone = servers
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 3, 28, 28)).astype(np.float32) for _ in range(4)]
    labels = [[1], [2], [99], [4]]  # 99 is out of range for 10 classes
    with Client(batching, timeout=60) as b, Client(alone, timeout=60) as a:
        calls = [
            (lambda x=x, y=y: b.analyze("convnet", x, ["relu_1"], Objective.cross_entropy(y)))
            for x, y in zip(xs, labels)
        ]
        results = concurrently(calls)
        for x, y, r in zip(xs, labels, results):
            if y == [99]:
                assert isinstance(r, GradtapError) and r.field == "objective.cross_entropy.labels"
                continue
            assert isinstance(r, Result), r
            expected = a.analyze("convnet", x, ["relu_1"], Objective.cross_entropy(y))
            np.testing.assert_allclose(
                r.gradients["relu_1"], expected.gradients["relu_1"], rtol=RTOL, atol=ATOL
            )


def test_models_that_mix_samples_are_never_merged(servers: tuple[str, str]) -> None:
    batching, _ = servers
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((2, 8)).astype(np.float32) for _ in range(6)]
    with Client(batching, timeout=60) as b:
        results = concurrently(
            [
                (lambda x=x: b.analyze("centered", x, ["fc"], Objective.sum(), input_grads=True))
                for x in xs
            ]
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Centered().eval()
    for x, r in zip(xs, results):
        assert isinstance(r, Result), r
        assert r.metadata["batch_size"] == 1
        t = torch.from_numpy(x).requires_grad_(True)
        model(t).sum().backward()
        assert t.grad is not None
        np.testing.assert_allclose(r.input_grads[0], t.grad.numpy(), rtol=RTOL, atol=ATOL)


def test_an_archive_can_opt_out_of_batching(tmp_path_factory: pytest.TempPathFactory) -> None:
    repository = tmp_path_factory.mktemp("optout")
    program = export_builtin("seed-mlp")
    torch.export.save(
        program, repository / "mlp.pt2", extra_files={"gradtap.json": '{"batching": false}'}
    )
    torch.export.save(program, repository / "bad.pt2", extra_files={"gradtap.json": '{"run": "x"}'})
    running = start(
        "127.0.0.1:0",
        Settings(
            device="cpu",
            builtins=False,
            model_repository=repository,
            max_batch_size=16,
            batch_timeout_us=200_000,
            max_workers=16,
        ),
    )
    try:
        rng = np.random.default_rng(9)
        xs = [rng.standard_normal((1, 784)).astype(np.float32) for _ in range(6)]
        with Client(f"127.0.0.1:{running.port}", timeout=60) as c:
            ready = [m.name for m in c.list_models() if m.state == "READY"]
            assert ready == ["mlp"]  # bad options: refused
            results = concurrently(
                [(lambda x=x: c.analyze("mlp", x, ["relu_1"], Objective.sum())) for x in xs]
            )
        assert all(isinstance(r, Result) and r.metadata["batch_size"] == 1 for r in results)
    finally:
        running.server.stop(None).wait()


def test_refused_and_finished_requests_leave_no_queues_behind(served: Served) -> None:
    """Batching keys must never accumulate: one per unknown name would be a memory leak."""
    batcher = served.running.batcher
    with Client(served.address, timeout=60) as c:
        x = np.zeros((1, 784), np.float32)
        for i in range(20):
            with pytest.raises(GradtapError):
                c.analyze("seed-mlp", x, [f"nope{i}"], Objective.sum())
        results = concurrently(
            [(lambda: c.analyze("seed-mlp", x, ["relu_1"], Objective.sum())) for _ in range(6)]
        )
    assert all(isinstance(r, Result) for r in results)
    assert batcher._queues == {}


def test_a_lone_request_runs_once_and_a_cancelled_one_not_at_all() -> None:
    registry = Registry(torch.device("cpu"))
    model = registry.add("mlp", "test", export_builtin("seed-mlp"))
    passes: list[int] = []
    batcher = Batcher(Engine(torch.device("cpu")), observe=passes.append)
    x = torch.zeros(1, 784)

    def analysis(objective: EngineObjective) -> Analysis:
        return Analysis([x], [Target("relu_1")], objective)

    ok = batcher.analyze(model, analysis(EngineObjective("sum")), lambda: False)
    assert ok.batch_size == 1 and passes == [1]
    with pytest.raises(InvalidArgument) as info:  # logits have 10 entries
        batcher.analyze(model, analysis(EngineObjective("logit", index=(99,))), lambda: False)
    assert info.value.reason == "OUT_OF_RANGE"
    assert passes == [1, 1]  # its own error, from its one pass
    with pytest.raises(Cancelled):
        batcher.analyze(model, analysis(EngineObjective("sum")), lambda: True)
    assert passes == [1, 1]
    assert batcher._queues == {}


def test_merged_passes_stay_within_the_models_batch_range() -> None:
    """The engine trusts that inputs fit the model, so the batcher never merges more rows
    than the model's exported batch range takes, however many requests wait."""
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=4)
    program = torch.export.export(
        nn.Linear(3, 2), (torch.zeros(2, 3),), dynamic_shapes=({0: batch},)
    )
    model = Registry(torch.device("cpu")).add("small", "test", program)
    passes: list[int] = []
    # Every request waits for companions (always_wait) until a pass is full: 24 requests of
    # 2 rows make 12 passes of 4 rows, whatever the timing. The timeout only bounds a failure.
    batcher = Batcher(
        Engine(torch.device("cpu")),
        max_batch_size=16,
        timeout_us=30_000_000,
        observe=passes.append,
        always_wait=True,
    )
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    request = Analysis([x], [Target("linear", activation=True)], EngineObjective("sum"))
    start_together = threading.Barrier(8)

    def run() -> list[torch.Tensor]:
        start_together.wait()
        outcomes = [batcher.analyze(model, request, lambda: False) for _ in range(3)]
        return [c.tensor for o in outcomes for c in o.tensors]

    results: list[list[torch.Tensor]] = []
    threads = [threading.Thread(target=lambda: results.append(run())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = Engine(torch.device("cpu")).analyze(model, request)
    assert len(results) == 8
    for tensors in results:
        for got, want in zip(tensors, [c.tensor for c in alone.tensors] * 3):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert passes == [4] * 12  # merged, and never past the range
