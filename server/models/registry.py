"""The served models: each a name with versions that load, serve calls, and drain away.

A version is LOADING, READY, FAILED (with the reason) or UNLOADING. A call names a model and
optionally a version or a digest; without them it gets the default version, the newest
READY one in natural order unless an operator pinned another. `use` routes a call and holds
the version's loaded model for as long as the call runs: replacing or unloading a version
only stops routing new calls to it, and its model is let go (`on_retired`, where the engine
drops its caches) once the last call on it has finished.

Loads run one at a time, off the serving path: the registry's lock is never held while an
archive is read, so calls keep flowing. Before a load takes memory it asks `reserve` (an
admission hook) with an estimate of the bytes; a load that fails or is refused gives back
everything it took.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import cast

import torch
from torch.export import ExportedProgram

from ..errors import FailedPrecondition, ModelLoadError, NotFound
from .archive import read_archive
from .model import Model, prepare
from .padding import padding_of
from .text import read_tokenizer
from .versions import (
    DEFAULT_VERSION,
    VERSION,
    Entry,
    LoadFailed,
    ModelStatus,
    Slot,
    State,
    VersionStatus,
    load_failure,
    unpacked_size,
    valid_name,
    valid_version,
)
from .versions import MODEL_NAME as MODEL_NAME

log = logging.getLogger(__name__)

Reserve = Callable[[int, str], AbstractContextManager[None]]
"""An admission hook: reserve(estimated bytes, what) holds memory for a load while it runs,
or raises (a RequestError, e.g. RESOURCE_EXHAUSTED) to refuse it."""


def _no_reserve(size: int, what: str) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


class Registry:
    """The served models by name, each with its versions. Safe to use from many threads."""

    def __init__(
        self,
        device: torch.device,
        reserve: Reserve = _no_reserve,
        on_retired: Callable[[Model], None] | None = None,
    ) -> None:
        self.device = device
        self.reserve = reserve
        self.on_retired = on_retired
        """Called once a replaced or unloaded model's last call finished."""
        self.on_change: Callable[[str], None] | None = None
        """Called with a model's name after any of its versions changed state."""
        self._lock = threading.Lock()
        self._loading = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._calls: dict[int, int] = {}
        """Calls running, by Model.key."""
        self._retired: dict[int, Model] = {}
        """Models no call is routed to any more, waiting for their last call."""
        self.loads: Counter[tuple[str, str, str]] = Counter()
        """Finished loads by (model, source, result: "ready" or "failed")."""
        self.served: Counter[tuple[str, str]] = Counter()
        """Calls routed, by (model, version); a version's count goes when it does."""

    # -- serving ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, name: str, version: str = "", digest: str = "") -> Iterator[Model]:
        """The model a call names, held until the call ends; raises the RequestError that
        says why the call cannot have one (fields model.version and model.digest)."""
        with self._lock:
            model = self._route(name, version, digest)
            self._calls[model.key] = self._calls.get(model.key, 0) + 1
            self.served[(name, model.version)] += 1
        try:
            yield model
        finally:
            self._release(model)

    def _route(self, name: str, version: str, digest: str) -> Model:
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(f"no model named {name!r}", reason="MODEL_NOT_FOUND", field="model.name")
        if version:
            slot = entry.slots.get(version)
            if slot is None:
                raise NotFound(
                    f"model {name!r} has no version {version!r}",
                    reason="VERSION_NOT_FOUND",
                    field="model.version",
                )
            if slot.state is not State.READY or slot.model is None:
                why = f": {slot.reason}" if slot.reason else ""
                raise FailedPrecondition(
                    f"version {version!r} of model {name!r} is {slot.state.value}{why}",
                    reason="VERSION_NOT_READY",
                    field="model.version",
                )
            if digest and slot.model.digest != digest:
                raise FailedPrecondition(
                    f"version {version!r} of model {name!r} has digest {slot.model.digest}, "
                    f"not the pinned {digest[:80]}",
                    reason="DIGEST_MISMATCH",
                    field="model.digest",
                )
            return slot.model
        default = entry.default()
        if digest:
            ready = [s for s in reversed(entry.ordered()) if s.state is State.READY]
            matching = [s for s in ready if s.model is not None and s.model.digest == digest]
            if not matching:
                shown = default.digest if default is not None else "no ready version"
                raise FailedPrecondition(
                    f"model {name!r} has digest {shown}, not the pinned {digest[:80]}, "
                    "and no other ready version has it",
                    reason="DIGEST_MISMATCH",
                    field="model.digest",
                )
            chosen = default if default in matching else matching[0]
            assert chosen is not None and chosen.model is not None
            return chosen.model
        if default is None or default.model is None:
            status = self._status(entry)
            if status.state is State.FAILED:
                raise FailedPrecondition(
                    f"model {name!r} failed to load: {status.reason}",
                    reason="MODEL_FAILED",
                    field="model.name",
                )
            raise FailedPrecondition(
                f"model {name!r} has no ready version ({status.state.value.lower()})",
                reason="MODEL_NOT_READY",
                field="model.name",
            )
        return default.model

    def _release(self, model: Model) -> None:
        with self._lock:
            left = self._calls[model.key] - 1
            if left:
                self._calls[model.key] = left
                return
            del self._calls[model.key]
            gone = self._retired.pop(model.key, None)
            if gone is None:
                return
            self._drop_unloading(gone)
        self._let_go(gone)
        self._changed(model.name)

    def get(self, name: str) -> Model | None:
        """The model a call naming only `name` would get now (not held), or None."""
        with self._lock:
            entry = self._entries.get(name) if MODEL_NAME.fullmatch(name) else None
            slot = entry.default() if entry is not None else None
            return slot.model if slot is not None else None

    def __iter__(self) -> Iterator[Model]:
        """Each model's default version, by name; models without a ready one are left out."""
        with self._lock:
            defaults = [e.default() for _, e in sorted(self._entries.items())]
        return iter([s.model for s in defaults if s is not None and s.model is not None])

    def __len__(self) -> int:
        return len(self._entries)

    def counts(self) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str], int]]:
        """A copy of `loads` and `served`, taken at once (for a metrics scrape)."""
        with self._lock:
            return dict(self.loads), dict(self.served)

    def in_flight(self, model: Model) -> int:
        """Calls running on `model` now."""
        with self._lock:
            return self._calls.get(model.key, 0)

    # -- what is served -----------------------------------------------------------------------

    def statuses(self) -> list[ModelStatus]:
        """Every model, by name, with every version."""
        with self._lock:
            return [self._status(e) for _, e in sorted(self._entries.items())]

    def status(self, name: str) -> ModelStatus | None:
        with self._lock:
            entry = self._entries.get(name)
            return self._status(entry) if entry is not None else None

    def source_of(self, name: str, version: str) -> str | None:
        """Where the version came from, or None when there is no such version."""
        with self._lock:
            slot = self._entries.get(name, Entry(name)).slots.get(version)
            return slot.source if slot is not None else None

    def _status(self, entry: Entry) -> ModelStatus:
        slots = entry.ordered()
        versions = tuple(
            VersionStatus(s.version, s.digest, s.state, s.reason, s.source) for s in slots
        )
        default = entry.default()
        if default is not None:
            return ModelStatus(entry.name, default.version, versions, State.READY, "")
        newest = slots[-1].version if slots else ""
        states = {s.state for s in slots}
        if State.LOADING in states:
            return ModelStatus(entry.name, newest, versions, State.LOADING, "")
        if states == {State.FAILED}:
            return ModelStatus(entry.name, newest, versions, State.FAILED, slots[-1].reason)
        return ModelStatus(entry.name, newest, versions, State.UNLOADING, "")

    # -- loading ------------------------------------------------------------------------------

    def add(
        self, name: str, source: str, program: ExportedProgram, version: str = DEFAULT_VERSION
    ) -> Model:
        """Serves an exported program (a built-in model) as a new version at once."""
        if not MODEL_NAME.fullmatch(name):
            raise ModelLoadError(f"model name {name!r} does not match {MODEL_NAME.pattern}")
        if not valid_version(version):
            raise ModelLoadError(f"version {version!r} does not match {VERSION.pattern}")
        with self._loading:
            with self._lock:
                if version in self._entries.get(name, Entry(name)).slots:
                    raise ModelLoadError(f"model {name!r} version {version!r} is defined twice")
            model = prepare(name, source, program, self.device, version)
            with self._lock:
                entry = self._entries.setdefault(name, Entry(name))
                entry.slots[version] = Slot(
                    version, State.READY, source, model=model, digest=model.digest
                )
        self._changed(name)
        return model

    def load(
        self,
        name: str,
        version: str,
        data: bytes | bytearray,
        source: str,
        *,
        keep_failure: bool = True,
        max_unpacked: int | None = None,
    ) -> Model:
        """Loads archive bytes as `version` of `name` (empty: one past its highest numeric
        version); a READY version of that name keeps serving until the new one is READY, then
        new calls go to the new one.

        A failure leaves the version FAILED with its reason (`keep_failure`), or leaves the
        registry as it was (for uploads: their caller hears the reason). A version that was
        READY keeps serving and notes the failed reload in its reason.

        Raises:
            LoadFailed: the archive was refused, or the admission hook refused the load.
        """
        if not valid_name(name) or (version and not valid_version(version)):
            raise LoadFailed(f"invalid model name or version: {name[:128]!r} {version[:64]!r}")
        with self._loading:
            version = version or self._next_version(name)
            before = self._begin(name, version, source)
            self._changed(name)
            failure = None
            try:
                model = self._build(name, version, data, source, max_unpacked)
            except Exception as e:  # noqa: BLE001 - any failure is a failed load
                failure = load_failure(e)
            if failure is not None:
                # Out of the except block, the exception and the frames that held what the
                # load took are gone: its tensors are freed now, by reference counting (a
                # full gc.collect would stall every call for most of a second).
                self._fail(name, version, source, failure.reason, before, keep_failure)
                self._changed(name)
                raise failure
            with self._lock:
                slot = self._entries[name].slots[version]
                old, slot.model = slot.model, model
                slot.state, slot.reason, slot.source = State.READY, "", source
                slot.digest = model.digest
                idle = old if old is not None and not self._calls.get(old.key) else None
                if old is not None and idle is None:
                    self._retired[old.key] = old  # it goes when its last call ends
                self.loads[(name, source, "ready")] += 1
        if idle is not None:
            self._let_go(idle)
        self._changed(name)
        log.info("model %s version %s is READY (%s, %s)", name, version, source, model.digest)
        return model

    def refuse(self, name: str, version: str, source: str, reason: str) -> None:
        """Marks a version FAILED whose archive was refused before its bytes were read (too
        large, a link out of the repository); a READY one keeps serving. LoadFailed: built in."""
        with self._loading:
            before = self._begin(name, version, source)
            self._fail(name, version, source, reason, before, keep_failure=True)
        self._changed(name)

    def _next_version(self, name: str) -> str:
        """One past the highest numeric version of `name`; "1" for a new model."""
        with self._lock:
            slots = self._entries.get(name, Entry(name)).slots
            return str(max((int(v) for v in slots if v.isdigit()), default=0) + 1)

    def _begin(self, name: str, version: str, source: str) -> Slot | None:
        """Marks the version LOADING unless it serves; returns a copy of what was there."""
        with self._lock:
            entry = self._entries.setdefault(name, Entry(name))
            slot = entry.slots.get(version)
            if slot is not None and slot.source == "builtin" and slot.state is State.READY:
                why = f"version {version!r} of {name!r} is built in: load another version"
                raise LoadFailed(why, FailedPrecondition(why, reason="VERSION_BUILT_IN"))
            before = None if slot is None else Slot(**slot.__dict__)
            if slot is None or slot.state is not State.READY:
                entry.slots[version] = Slot(version, State.LOADING, source)
            return before

    def _build(
        self,
        name: str,
        version: str,
        data: bytes | bytearray,
        source: str,
        max_unpacked: int | None,
    ) -> Model:
        estimate = unpacked_size(data, max_unpacked)
        with self.reserve(estimate, f"load of model {name} version {version}"):
            archive = read_archive(cast(bytes, data))  # io.BytesIO takes either: no copy
            options = archive.options
            model = prepare(
                name,
                source,
                archive.program,
                self.device,
                version,
                dims=options.get("dims"),
                renamed=archive.renamed,
            )
            model.batchable = bool(options.get("batching", True))
            model.padding = padding_of(model, options)
            if archive.tokenizer_json is not None:
                model.tokenizer = read_tokenizer(archive.tokenizer_json)
            for renamed in archive.renamed:
                log.info("model %s version %s: %s", name, version, renamed)
            return model

    def _fail(
        self,
        name: str,
        version: str,
        source: str,
        reason: str,
        before: Slot | None,
        keep_failure: bool,
    ) -> None:
        log.error("model %s version %s failed to load: %s", name, version, reason)
        with self._lock:
            self.loads[(name, source, "failed")] += 1
            entry = self._entries[name]
            slot = entry.slots[version]
            if slot.state is State.READY:
                if keep_failure:
                    slot.reason = f"reload failed, still serving the archive before: {reason}"
            elif keep_failure:
                slot.state, slot.reason = State.FAILED, reason
            elif before is not None:
                entry.slots[version] = before
            else:
                del entry.slots[version]
                if not entry.slots:
                    del self._entries[name]

    # -- unloading and the default ------------------------------------------------------------

    def unload(self, name: str, version: str = "") -> None:
        """Unloads one version, or every version: no new call goes to them, and each goes
        once its calls have finished (UNLOADING until then).

        Raises:
            NotFound: no such model or version (fields name, version).
        """
        with self._loading:
            idle: list[Model] = []
            with self._lock:
                entry = self._existing(name)
                versions = [version] if version else list(entry.slots)
                if version and version not in entry.slots:
                    raise _no_version(name, version)
                for v in versions:
                    slot = entry.slots[v]
                    model = slot.model if slot.state is State.READY else None
                    if slot.state is State.UNLOADING:
                        continue
                    if model is None or not self._calls.get(model.key):
                        del entry.slots[v]
                        if model is not None:
                            idle.append(model)
                        continue
                    slot.state, slot.reason = State.UNLOADING, ""
                    self._retired[model.key] = model
                if entry.pinned in versions:
                    entry.pinned = None
                if not entry.slots:
                    del self._entries[name]
                for v in versions:
                    if v not in entry.slots:
                        self.served.pop((name, v), None)
        for model in idle:
            self._let_go(model)
        log.info("model %s: unloaded %s", name, f"version {version}" if version else "all")
        self._changed(name)

    def set_default(self, name: str, version: str = "") -> None:
        """Pins the default version of `name` to a READY `version`; "" unpins (the newest
        READY version is the default again).

        Raises:
            NotFound, FailedPrecondition: no such version, or one that is not READY.
        """
        with self._lock:
            entry = self._existing(name)
            if version:
                slot = entry.slots.get(version)
                if slot is None:
                    raise _no_version(name, version)
                if slot.state is not State.READY:
                    raise FailedPrecondition(
                        f"version {version!r} of model {name!r} is {slot.state.value}; only a "
                        "READY version can be the default",
                        reason="VERSION_NOT_READY",
                        field="version",
                    )
            entry.pinned = version or None
        log.info("model %s: default version %s", name, version or "(newest)")
        self._changed(name)

    def _existing(self, name: str) -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(f"no model named {name[:128]!r}", reason="MODEL_NOT_FOUND", field="name")
        return entry

    # -- letting go ---------------------------------------------------------------------------

    def _drop_unloading(self, model: Model) -> None:
        """Removes the UNLOADING slot `model` drained from (lock held)."""
        entry = self._entries.get(model.name)
        slot = entry.slots.get(model.version) if entry is not None else None
        if entry is None or slot is None or slot.model is not model:
            return
        if slot.state is State.UNLOADING:
            del entry.slots[model.version]
            self.served.pop((model.name, model.version), None)
            if not entry.slots:
                del self._entries[model.name]

    def _let_go(self, model: Model) -> None:
        """`model` serves no call and never will again: its caches go, then its memory."""
        log.info("model %s version %s let go (%s)", model.name, model.version, model.digest)
        if self.on_retired is not None:
            self.on_retired(model)
        # The registry, the engine and the last call have dropped it: its weights go with
        # the last reference (only its graph's fake tensors wait for the cycle collector).

    def _changed(self, name: str) -> None:
        if self.on_change is not None:
            self.on_change(name)


def _no_version(name: str, version: str) -> NotFound:
    return NotFound(
        f"model {name[:128]!r} has no version {version[:64]!r}",
        reason="VERSION_NOT_FOUND",
        field="version",
    )
