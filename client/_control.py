"""The model-control calls, each written once (see _calls.py): load a version from an
archive, unload one, pick the default. They need a server started with --model-control and
a token holding @admin (docs/operations.md, "Managing models").
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from gradtap.v1 import model_service_pb2 as ms

from ._assemble import Reply, model_info, model_version
from ._exchange import Call, Method
from ._request import checked_name, checked_version
from ._result import ModelInfo, ModelVersion

CHUNK_BYTES = 1 << 20
"""Bytes of archive per message of an upload."""

_SERVICE = "/gradtap.v1.ModelService/"
LOAD_MODEL = Method(
    _SERVICE + "LoadModel",
    "stream_unary",
    ms.LoadModelRequest.SerializeToString,
    ms.LoadModelResponse.FromString,
)
LOAD_FROM_REPOSITORY = Method(
    _SERVICE + "LoadModelFromRepository",
    "unary_unary",
    ms.LoadModelFromRepositoryRequest.SerializeToString,
    ms.LoadModelFromRepositoryResponse.FromString,
)
UNLOAD_MODEL = Method(
    _SERVICE + "UnloadModel",
    "unary_unary",
    ms.UnloadModelRequest.SerializeToString,
    ms.UnloadModelResponse.FromString,
)
SET_DEFAULT_VERSION = Method(
    _SERVICE + "SetDefaultVersion",
    "unary_unary",
    ms.SetDefaultVersionRequest.SerializeToString,
    ms.SetDefaultVersionResponse.FromString,
)

Archive = str | os.PathLike[str] | bytes
"""An archive from torch.export.save: its path, or its bytes."""


class Upload:
    """A LoadModel stream: the header (name, version, size, SHA-256), then the archive in
    chunks. A file is read twice, once for its digest and once as it is sent, so a large
    archive never sits in the client's memory; each iteration starts the stream afresh."""

    def __init__(self, name: str, archive: Archive, version: str) -> None:
        self.name = name
        self.version = version
        if isinstance(archive, (bytes, bytearray, memoryview)):
            self._data: bytes | None = bytes(archive)
            self._path: Path | None = None
            self.size, digest = len(self._data), hashlib.sha256(self._data)
        elif isinstance(archive, (str, os.PathLike)):
            self._data, self._path = None, Path(archive)
            if not self._path.is_file():
                raise ValueError(f"archive {str(archive)[:200]!r} is not a file")
            digest = hashlib.sha256()
            self.size = 0
            for chunk in self._chunks():
                digest.update(chunk)
                self.size += len(chunk)
        else:
            raise TypeError("archive must be a path or the archive's bytes")
        if self.size == 0:
            raise ValueError("the archive is empty")
        self.digest = "sha256:" + digest.hexdigest()

    def _chunks(self) -> Iterator[bytes]:
        if self._data is not None:
            for start in range(0, len(self._data), CHUNK_BYTES):
                yield self._data[start : start + CHUNK_BYTES]
            return
        assert self._path is not None
        with self._path.open("rb") as file:
            while chunk := file.read(CHUNK_BYTES):
                yield chunk

    def __iter__(self) -> Iterator[ms.LoadModelRequest]:
        yield ms.LoadModelRequest(
            header=ms.UploadHeader(
                name=self.name, version=self.version, size=self.size, archive_digest=self.digest
            )
        )
        for chunk in self._chunks():
            yield ms.LoadModelRequest(chunk=chunk)


def load_model(
    name: str, archive: Archive, version: str | None = None, *, timeout: float | None = None
) -> Call[ModelVersion]:
    """Loads an archive as a version of a model, streaming it to the server in chunks.

    The server checks the archive's size and SHA-256, then loads it with the same safe
    loader as its model repository. A READY version of that name keeps serving until the
    new one is READY; then calls naming no version get the new one if it is the newest (or
    the pinned default). The upload lives in the server's memory only.

    Args:
        name: the model's name: [A-Za-z0-9][A-Za-z0-9._-]{0,127}, without "..".
        archive: the archive torch.export.save wrote: its path, or its bytes.
        version: [A-Za-z0-9][A-Za-z0-9._-]{0,63}, without ".."; None picks one past the
            model's highest numeric version ("1" for a new model).
        timeout: deadline in seconds for the whole upload and load.

    Returns:
        The ModelVersion loaded (READY), with its digest.

    Raises:
        GradtapError: INVALID_ARGUMENT (BAD_ARCHIVE, with the loader's reason), RESOURCE_EXHAUSTED
            (UPLOAD_TOO_LARGE), PERMISSION_DENIED (a token without @admin), UNIMPLEMENTED
            (a server without --model-control), ...
        ValueError, TypeError: a name, version or archive the client cannot send.
    """
    upload = Upload(checked_name(name), archive, checked_version(version))
    return Call(LOAD_MODEL, upload, lambda _: Reply(_loaded), timeout)


def load_model_from_repository(
    name: str, version: str | None = None, *, timeout: float | None = None
) -> Call[ModelInfo]:
    """Loads (again) a version, or every version, of a model from the archives already in
    the server's model repository (NAME.pt2 is version "1", NAME/VERSION.pt2 the others).

    Returns:
        The model with every version.

    Raises:
        GradtapError: NOT_FOUND (ARCHIVE_NOT_FOUND), FAILED_PRECONDITION (LOAD_FAILED with the
            loader's reason, NO_REPOSITORY), PERMISSION_DENIED, ...
        ValueError: a name or version the client cannot send.
    """
    message = ms.LoadModelFromRepositoryRequest(
        name=checked_name(name), version=checked_version(version)
    )
    return Call(LOAD_FROM_REPOSITORY, message, lambda _: Reply(_model), timeout)


def unload_model(
    name: str, version: str | None = None, *, timeout: float | None = None
) -> Call[ModelInfo | None]:
    """Unloads one version of a model, or (without a version) the whole model.

    No new call goes to what is unloaded; the calls already running on it finish (it shows
    UNLOADING until then).

    Returns:
        The model with the versions it has left, or None when it is gone.

    Raises:
        GradtapError: NOT_FOUND (MODEL_NOT_FOUND, VERSION_NOT_FOUND), PERMISSION_DENIED, ...
        ValueError: a name or version the client cannot send.
    """
    message = ms.UnloadModelRequest(name=checked_name(name), version=checked_version(version))
    return Call(UNLOAD_MODEL, message, lambda _: Reply(_left), timeout)


def set_default_version(
    name: str, version: str | None, *, timeout: float | None = None
) -> Call[ModelInfo]:
    """Pins the version that calls naming none get; None unpins it (the newest READY
    version is the default again).

    Raises:
        GradtapError: NOT_FOUND (VERSION_NOT_FOUND), FAILED_PRECONDITION (VERSION_NOT_READY),
            PERMISSION_DENIED, ...
        ValueError: a name or version the client cannot send.
    """
    message = ms.SetDefaultVersionRequest(name=checked_name(name), version=checked_version(version))
    return Call(SET_DEFAULT_VERSION, message, lambda _: Reply(_model), timeout)


def _loaded(r: ms.LoadModelResponse) -> ModelVersion:
    return model_version(r.version)


def _left(r: ms.UnloadModelResponse) -> ModelInfo | None:
    return model_info(r.model) if r.HasField("model") else None


def _model(r: ms.SetDefaultVersionResponse | ms.LoadModelFromRepositoryResponse) -> ModelInfo:
    return model_info(r.model)
