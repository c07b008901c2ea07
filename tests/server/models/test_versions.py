"""The registry's versions in-process: natural order, the default, failed loads that give back
every tensor they took, and the admission hook asked before any is taken."""

from __future__ import annotations

import contextlib
import gc
import io
import warnings
from collections.abc import Iterator

import pytest
import torch
from gradtap.server.errors import ResourceExhausted
from gradtap.server.models.registry import Registry
from gradtap.server.models.versions import LoadFailed, State, natural, unpacked_size
from torch._subclasses.fake_tensor import FakeTensor

from ... import models


@torch.library.custom_op("gradtaptest::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Big(torch.nn.Module):
    """16 MiB of weights behind an operator the loader refuses: it fails after torch has
    read every weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(2048, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return twice(self.fc(x))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def refused_archive() -> bytes:
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(Big(), (torch.ones(1, 2048),)), buffer)
    return buffer.getvalue()


def live_tensors() -> tuple[int, int]:
    """How many tensors with real storage are alive, and their bytes, without collecting
    cycles first: what a load took must go at once, by reference counting."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merely touching some torch modules warns
        found = [
            o
            for o in gc.get_objects()
            if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor) and not o.is_meta
        ]
    return len(found), sum(t.untyped_storage().nbytes() for t in found)


def registry() -> Registry:
    return Registry(torch.device("cpu"))


def test_versions_sort_in_natural_order() -> None:
    versions = ["10", "9", "1", "2024-06-01", "2", "v1", "1.10", "1.9"]
    assert sorted(versions, key=natural) == [
        "1", "1.9", "1.10", "2", "9", "10", "2024-06-01", "v1",
    ]  # fmt: skip


def test_the_default_is_the_newest_ready_version_unless_pinned() -> None:
    r = registry()
    for k, version in [(1, "9"), (2, "10"), (3, "2")]:
        r.load("m", version, models.scale_archive(k), "upload")
    with r.use("m") as model:
        assert model.version == "10"
    r.set_default("m", "2")
    with r.use("m") as model:
        assert model.version == "2"
    r.unload("m", "2")  # unloading the pinned version unpins it
    with r.use("m") as model:
        assert model.version == "10"


def test_a_failed_new_version_leaves_the_default_serving_and_says_why() -> None:
    r = registry()
    r.load("m", "1", models.scale_archive(1), "repository")
    with pytest.raises(LoadFailed, match="not a zip"):
        r.load("m", "2", b"garbage", "repository")
    status = r.status("m")
    assert status is not None and status.state is State.READY and status.default_version == "1"
    assert [(v.version, v.state) for v in status.versions] == [
        ("1", State.READY),
        ("2", State.FAILED),
    ]
    assert "not a zip" in status.versions[1].reason


def test_a_failed_reload_keeps_the_version_serving_with_the_reason() -> None:
    r = registry()
    first = r.load("m", "1", models.scale_archive(1), "repository")
    with pytest.raises(LoadFailed):
        r.load("m", "1", b"garbage", "repository")
    with r.use("m", "1") as model:
        assert model is first
    status = r.status("m")
    assert status is not None and status.versions[0].state is State.READY
    assert status.versions[0].reason.startswith("reload failed")


def test_a_model_whose_every_version_failed_is_listed_as_failed() -> None:
    r = registry()
    with pytest.raises(LoadFailed):
        r.load("m", "1", b"garbage", "repository")
    (status,) = r.statuses()
    assert status.state is State.FAILED and "not a zip" in status.reason


def test_a_failed_load_gives_back_every_tensor_it_took(refused_archive: bytes) -> None:
    r = registry()
    r.load("small", "1", models.scale_archive(1), "upload")
    gc.collect()
    gc.disable()  # no cycle collection may help: what a failed load took goes by itself
    try:
        before = live_tensors()
        for _ in range(3):
            with pytest.raises(LoadFailed, match="gradtaptest.twice"):
                r.load("big", "1", refused_archive, "repository")
        assert live_tensors() == before
    finally:
        gc.enable()


def test_the_admission_hook_is_asked_first_and_its_refusal_takes_nothing(
    refused_archive: bytes,
) -> None:
    asked: list[tuple[int, str]] = []
    held: list[str] = []

    @contextlib.contextmanager
    def refuse(size: int, what: str) -> Iterator[None]:
        asked.append((size, what))
        raise ResourceExhausted("no room for it", reason="NO_ROOM")
        yield

    r = Registry(torch.device("cpu"), reserve=refuse)
    before = live_tensors()
    with pytest.raises(LoadFailed) as e:
        r.load("big", "1", refused_archive, "upload", keep_failure=False)
    assert isinstance(e.value.cause, ResourceExhausted) and e.value.cause.reason == "NO_ROOM"
    assert live_tensors() == before
    assert r.statuses() == []  # an upload that failed leaves nothing behind
    ((size, what),) = asked
    assert size >= 2048 * 2048 * 4 and "big" in what

    @contextlib.contextmanager
    def admit(size: int, what: str) -> Iterator[None]:
        held.append(what)
        try:
            yield
        finally:
            held.remove(what)

    r = Registry(torch.device("cpu"), reserve=admit)
    with pytest.raises(LoadFailed):
        r.load("big", "1", refused_archive, "repository")
    assert held == []  # the reservation ends with the failed load
    r.load("small", "1", models.scale_archive(1), "repository")
    assert held == []


def test_unpacked_size_is_the_estimate_and_refuses_bombs() -> None:
    archive = models.scale_archive(1)
    assert unpacked_size(archive) >= len(archive)
    with pytest.raises(Exception, match="over the limit"):
        unpacked_size(archive, limit=10)
