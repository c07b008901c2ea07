"""The model repository: a directory of archives, read at start and, in poll mode, watched.

    models/
      seed-like.pt2          version "1" of seed-like
      ranker/3.pt2           version "3" of ranker (Triton's layout: one file per version)
      ranker/10.pt2          version "10", the newest: ranker's default

Names and versions must be valid (registry.valid_name, valid_version); other files are
skipped with a log line, and so is a NAME.pt2 beside a NAME/1.pt2, which wins. Archives of
a built-in model's version "1" are refused. Each poll notices archives added, changed (size
or mtime first, then the content's SHA-256) and removed; a file is read again only when it
changed, so a broken archive is reported once, not on every poll.

No archive stops the server: one that cannot be read or loaded is logged with its cause and
its version shows FAILED with the reason. A file is checked before it is read whole
(`read_file`): a symbolic link must resolve to a file inside the repository, the file must
be a plain file of at most `max_archive_bytes`, and its zip directory must declare no more
than that many bytes unpacked (and no member a zip bomb); then at most that many bytes are
read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError, NotFound
from .registry import Registry
from .versions import DEFAULT_VERSION, LoadFailed, unpacked_size, valid_name, valid_version

log = logging.getLogger(__name__)

SUFFIX = ".pt2"
SOURCE = "repository"
MAX_ARCHIVE_BYTES = 8 << 30
"""The default cap on an archive's file size and on its members' declared unpacked size."""

Key = tuple[str, str]
"""(model name, version)."""


@dataclass(frozen=True)
class Stamp:
    """What a file was when it was last read: poll reads it again only when it changes."""

    size: int
    mtime_ns: int
    sha256: str


def scan(directory: Path) -> dict[Key, Path]:
    """Every archive of the repository by (name, version)."""
    flat: dict[Key, Path] = {}
    nested: dict[Key, Path] = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.endswith(SUFFIX) and (entry.is_file() or entry.is_symlink()):
            name = entry.name[: -len(SUFFIX)]
            if valid_name(name):
                flat[(name, DEFAULT_VERSION)] = Path(entry.path)
            else:
                log.error("skipping %s: not a valid model name", entry.name[:200])
        elif entry.is_dir() and valid_name(entry.name):
            for file in sorted(os.scandir(entry.path), key=lambda e: e.name):
                version = file.name[: -len(SUFFIX)]
                if not file.name.endswith(SUFFIX) or not (file.is_file() or file.is_symlink()):
                    continue
                if valid_version(version):
                    nested[(entry.name, version)] = Path(file.path)
                else:
                    log.error("skipping %s/%s: not a valid version", entry.name, file.name[:200])
    for key in flat.keys() & nested.keys():
        log.warning("%s/1%s wins over %s%s", key[0], SUFFIX, key[0], SUFFIX)
    return {**flat, **nested}


def read_file(path: Path, root: Path, limit: int) -> tuple[bytes, os.stat_result]:
    """An archive file's bytes and what it was, checked before it is read whole.

    Raises:
        ModelLoadError: a link resolving out of `root`, not a plain file, a file larger than
            `limit`, or not a zip archive, or one declaring more than `limit` bytes unpacked
            or a member expanding too much (versions.unpacked_size).
        OSError: the file could not be opened or read.
    """
    try:
        target = path.resolve(strict=True)
    except RuntimeError:  # Python before 3.13 raises this for a loop of links
        raise ModelLoadError("a loop of symbolic links") from None
    if not target.is_relative_to(root.resolve(strict=True)):
        raise ModelLoadError(
            "a symbolic link leading out of the model repository; the server follows only "
            "links to files inside it (copy or mount the archive there)"
        )
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    with os.fdopen(os.open(target, flags), "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ModelLoadError("not a plain file")
        if info.st_size > limit:
            raise ModelLoadError(
                f"the file is {info.st_size} bytes, over the limit of {limit} (gradtap serve "
                "--max-archive-bytes)"
            )
        unpacked_size(file, limit)  # reads the zip's directory, never a member
        file.seek(0)
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ModelLoadError(f"the file grew past {limit} bytes while it was read")
    return data, info


class Repository:
    """Loads a repository's archives into a registry, and keeps them in step with the files."""

    def __init__(
        self, registry: Registry, directory: Path, max_archive_bytes: int = MAX_ARCHIVE_BYTES
    ) -> None:
        self.registry = registry
        self.directory = directory
        self.max_archive_bytes = max_archive_bytes
        self._stamps: dict[Key, Stamp] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load_all(self) -> list[str]:
        """Loads every archive once; returns those refused, as NAME or NAME/VERSION."""
        return self.poll()

    def poll(self) -> list[str]:
        """One look at the files: loads what was added or changed, unloads what was removed.
        Returns the archives whose load failed."""
        with self._lock:
            found = scan(self.directory)
            failed = []
            for key, path in found.items():
                try:
                    seen = path.stat()
                except OSError:
                    continue  # removed since the scan: the next poll sees it gone
                known = self._stamps.get(key)
                if known is not None and (known.size, known.mtime_ns) == (
                    seen.st_size,
                    seen.st_mtime_ns,
                ):
                    continue
                if self._read_and_load(key, path, known):
                    failed.append(_shown(key))
            for key in self._stamps.keys() - found.keys():
                del self._stamps[key]
                if self.registry.source_of(*key) == SOURCE:
                    log.info("%s is gone from the repository: unloading it", _shown(key))
                    try:
                        self.registry.unload(*key)
                    except NotFound:
                        pass
            return failed

    def load(self, name: str, version: str = "") -> list[str]:
        """Loads (again) the archives of one version, or of every version, of `name`, changed
        or not. Returns the versions loaded.

        Raises:
            NotFound: the repository has no such archive (field name or version).
            LoadFailed: an archive was refused; the others were loaded.
        """
        with self._lock:
            found = {k: p for k, p in scan(self.directory).items() if k[0] == name}
            if version:
                found = {k: p for k, p in found.items() if k[1] == version}
            if not found:
                what = f"{name}/{version}{SUFFIX}" if version else f"{name}{SUFFIX} or {name}/"
                raise NotFound(
                    f"the model repository has no {what[:200]}",
                    reason="ARCHIVE_NOT_FOUND",
                    field="version" if version else "name",
                )
            errors = [
                f"{_shown(key)}: {error}"
                for key, path in found.items()
                if (error := self._read_and_load(key, path, None))
            ]
            if errors:
                raise LoadFailed("; ".join(errors))
            return [v for _, v in found]

    def _read_and_load(self, key: Key, path: Path, known: Stamp | None) -> str:
        """Reads and loads one archive (unless its content is what was loaded before);
        returns why it failed, or ""."""
        try:
            data, info = read_file(path, self.directory, self.max_archive_bytes)
        except (OSError, ModelLoadError) as e:
            reason = f"cannot read it: {e.strerror}" if isinstance(e, OSError) else str(e)
            try:
                seen = path.stat()  # read again once it changes
                self._stamps[key] = Stamp(seen.st_size, seen.st_mtime_ns, "")
            except OSError:
                self._stamps.pop(key, None)
            try:
                self.registry.refuse(key[0], key[1], SOURCE, reason)
            except LoadFailed as refused:
                return refused.reason
            return reason
        digest = hashlib.sha256(data).hexdigest()
        stamp = Stamp(info.st_size, info.st_mtime_ns, digest)
        self._stamps[key] = stamp
        if known is not None and known.sha256 == digest:
            return ""  # touched, not changed
        try:
            self.registry.load(key[0], key[1], data, SOURCE, max_unpacked=self.max_archive_bytes)
        except LoadFailed as e:
            return e.reason
        return ""

    # -- poll mode ----------------------------------------------------------------------------

    def watch(self, interval: float) -> None:
        """Polls every `interval` seconds on a thread of its own, until `stop()`."""

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.poll()
                except Exception:  # noqa: BLE001 - the poller must outlive any one look
                    log.exception("polling the model repository failed")

        self._thread = threading.Thread(target=run, name="gradtap-repository", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops polling; waits for a poll in progress to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _shown(key: Key) -> str:
    name, version = key
    return name if version == DEFAULT_VERSION else f"{name}/{version}"


def load_repository(
    registry: Registry, directory: Path, max_archive_bytes: int = MAX_ARCHIVE_BYTES
) -> list[str]:
    """Loads every archive of the repository once; returns those it refused."""
    return Repository(registry, directory, max_archive_bytes).load_all()
