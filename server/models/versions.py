"""Versions: the names and versions a registry accepts, their order, their states, and
the estimate (and zip-bomb check) of what loading an archive takes, and the registry's
record of each model's versions (Entry, Slot)."""

from __future__ import annotations

import enum
import io
import logging
import re
import zipfile
from dataclasses import dataclass, field
from traceback import format_exception
from typing import TYPE_CHECKING, BinaryIO

from ..errors import ModelLoadError, RequestError

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Every model name matches this; names are looked up in a dict, never joined into paths
unless `valid_name` also holds."""

VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Every version matches this and holds no ".." (see `valid_version`)."""

DEFAULT_VERSION = "1"
"""The version of a built-in model and of a repository's NAME.pt2."""

BOMB_RATIO = 100
"""An archive member that expands more than this many times (past 1 MiB) is refused."""


def valid_name(name: str) -> bool:
    """A model name safe to join into a repository path: MODEL_NAME, no ".."."""
    return bool(MODEL_NAME.fullmatch(name)) and ".." not in name


def valid_version(version: str) -> bool:
    """VERSION and no "..": never a path separator, never a parent directory."""
    return bool(VERSION.fullmatch(version)) and ".." not in version


def natural(version: str) -> tuple[tuple[int, int, str], ...]:
    """The sort key of natural order: numeric parts compare as numbers ("10" after "9")."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.findall(r"\d+|\D+", version)
    )


class State(enum.Enum):
    """Where a version is in its life."""

    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"


@dataclass(frozen=True)
class VersionStatus:
    """One version as ListModels shows it."""

    version: str
    digest: str
    state: State
    reason: str
    source: str


@dataclass(frozen=True)
class ModelStatus:
    """A model as ListModels shows it: its versions, its default and its state."""

    name: str
    default_version: str
    versions: tuple[VersionStatus, ...]
    state: State
    reason: str

    @property
    def default(self) -> VersionStatus | None:
        return next((v for v in self.versions if v.version == self.default_version), None)


class LoadFailed(ModelLoadError):
    """A load that did not make a READY version: `reason` says why; `cause` is the
    RequestError that refused it (e.g. the admission hook's), when one did."""

    def __init__(self, reason: str, cause: RequestError | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


def unpacked_size(data: bytes | bytearray | BinaryIO, limit: int | None = None) -> int:
    """The bytes an archive's members expand to: the estimate of what loading it takes.

    Only the zip's central directory is read (the declared sizes), never a member, so a
    file can be checked before it is read whole. Raises ModelLoadError for what is not a zip
    archive, and for a zip bomb: past `limit` bytes in all, or a member that expands more
    than BOMB_RATIO times.
    """
    file = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        members = zipfile.ZipFile(file).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
        raise ModelLoadError("not a zip archive (torch.export.save writes one)") from e
    total = 0
    for info in members:
        total += info.file_size
        if info.file_size > 1 << 20 and info.file_size > BOMB_RATIO * max(info.compress_size, 1):
            raise ModelLoadError(
                f"archive member {info.filename[:80]!r} expands {info.file_size} bytes from "
                f"{info.compress_size}: more than {BOMB_RATIO} times"
            )
        if limit is not None and total > limit:
            raise ModelLoadError(
                f"the archive expands past {limit} bytes: over the limit (gradtap serve "
                "--max-archive-bytes; for uploads, 4 times --max-upload-bytes at most)"
            )
    return max(total, file.seek(0, io.SEEK_END))


def load_failure(error: Exception) -> LoadFailed:
    """What a failed load reports: the loader's own words, or the refusal."""
    if isinstance(error, LoadFailed):
        return LoadFailed(error.reason, error.cause)
    if isinstance(error, RequestError):
        refusal = type(error)(
            error.message, reason=error.reason, field=error.field, metadata=error.metadata
        )
        return LoadFailed(f"refused: {error.message}", refusal)
    if isinstance(error, ModelLoadError):
        return LoadFailed(str(error))
    # The traceback as text: a log record keeping exc_info would keep the load's frames.
    log.error("unexpected error while loading a model:\n%s", "".join(format_exception(error)))
    return LoadFailed(f"{type(error).__name__}: {str(error)[:400]}")


@dataclass(eq=False)
class Slot:
    """One version of a model."""

    version: str
    state: State
    source: str
    reason: str = ""
    model: Model | None = None
    """The model serving calls (READY), or draining them (UNLOADING)."""
    digest: str = ""


@dataclass(eq=False)
class Entry:
    """A model's name and versions, and the version an operator pinned as its default."""

    name: str
    slots: dict[str, Slot] = field(default_factory=dict)
    pinned: str | None = None

    def ordered(self) -> list[Slot]:
        return sorted(self.slots.values(), key=lambda s: natural(s.version))

    def default(self) -> Slot | None:
        """The slot that serves calls naming no version: pinned, else the newest READY."""
        pinned = self.slots.get(self.pinned or "")
        if pinned is not None and pinned.state is State.READY:
            return pinned
        return next((s for s in reversed(self.ordered()) if s.state is State.READY), None)
