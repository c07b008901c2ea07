"""Model control off and onto the wire: uploads checked as they arrive, names and versions
checked before anything is looked up, and the answers.

An upload's header is checked before its buffer is allocated: a valid name and version, a
declared size within the server's cap, a well-formed digest. The chunks then fill that buffer
and no more; the stream must end exactly at the declared size with the declared SHA-256.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import model_service_pb2 as ms

from ..errors import InvalidArgument, ResourceExhausted
from ..models.model import Model
from ..models.versions import MODEL_NAME, VERSION, ModelStatus, valid_name, valid_version
from . import responses

ARCHIVE_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Upload:
    """An archive received whole, its size and digest as declared."""

    name: str
    version: str
    data: bytearray
    digest: str


def name(value: str, field: str) -> str:
    """A model name fit for the registry and the repository: MODEL_NAME, no ".."."""
    if not value:
        raise InvalidArgument(f"{field} is required", reason="MISSING_MODEL", field=field)
    if not valid_name(value):
        raise InvalidArgument(
            f"{field} must match {MODEL_NAME.pattern} without '..'",
            reason="BAD_MODEL_NAME",
            field=field,
        )
    return value


def version(value: str, field: str, required: bool = False) -> str:
    """A version: VERSION without ".."; empty unless `required`."""
    if not value and not required:
        return value
    if not valid_version(value):
        raise InvalidArgument(
            f"{field} must match {VERSION.pattern} without '..'",
            reason="BAD_MODEL_VERSION",
            field=field,
        )
    return value


def upload(messages: Iterator[ms.LoadModelRequest], max_bytes: int) -> Upload:
    """Reads a LoadModel stream: the header, then the archive's bytes, checked as they come.

    Raises:
        InvalidArgument: a stream without a header first, a bad name or version, more or
            fewer bytes than declared (UPLOAD_SIZE_MISMATCH, UPLOAD_TRUNCATED), another
            SHA-256 than declared (UPLOAD_DIGEST_MISMATCH).
        ResourceExhausted: a declared size over `max_bytes` (UPLOAD_TOO_LARGE).
    """
    first = next(messages, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument(
            "a LoadModel stream starts with its header", reason="BAD_UPLOAD", field="header"
        )
    header = first.header
    model = name(header.name, "header.name")
    wanted = version(header.version, "header.version")
    if not ARCHIVE_DIGEST.fullmatch(header.archive_digest):
        raise InvalidArgument(
            "header.archive_digest must be 'sha256:' and 64 lowercase hex digits",
            reason="BAD_UPLOAD",
            field="header.archive_digest",
        )
    if header.size == 0:
        raise InvalidArgument(
            "header.size must be the archive's size in bytes",
            reason="BAD_UPLOAD",
            field="header.size",
        )
    if header.size > max_bytes:
        raise ResourceExhausted(
            f"the archive is {header.size} bytes; this server takes uploads of at most "
            f"{max_bytes} (--max-upload-bytes)",
            reason="UPLOAD_TOO_LARGE",
            field="header.size",
        )
    data = bytearray(header.size)
    hasher = hashlib.sha256()
    filled = 0
    for message in messages:
        if message.WhichOneof("part") != "chunk":
            raise InvalidArgument(
                "only the first message of a LoadModel stream is a header",
                reason="BAD_UPLOAD",
                field="header",
            )
        chunk = message.chunk
        if filled + len(chunk) > header.size:
            raise InvalidArgument(
                f"the stream carries more than the {header.size} bytes its header declared",
                reason="UPLOAD_SIZE_MISMATCH",
                field="header.size",
            )
        data[filled : filled + len(chunk)] = chunk
        hasher.update(chunk)
        filled += len(chunk)
    if filled < header.size:
        raise InvalidArgument(
            f"the stream ended after {filled} of the {header.size} bytes its header declared",
            reason="UPLOAD_TRUNCATED",
            field="chunk",
        )
    if "sha256:" + hasher.hexdigest() != header.archive_digest:
        raise InvalidArgument(
            "the archive's SHA-256 is not the one its header declared",
            reason="UPLOAD_DIGEST_MISMATCH",
            field="header.archive_digest",
        )
    return Upload(model, wanted, data, header.archive_digest)


def loaded(status: ModelStatus | None, model: Model) -> ms.LoadModelResponse:
    """The answer to an upload: the model, and the version just loaded."""
    response = ms.LoadModelResponse(
        version=pb.ModelVersionInfo(
            version=model.version,
            digest=model.digest,
            state=pb.MODEL_STATE_READY,
            source=model.source,
        )
    )
    if status is not None:
        response.model.CopyFrom(responses.model_summary(status))
    return response


def from_repository(status: ModelStatus | None) -> ms.LoadModelFromRepositoryResponse:
    response = ms.LoadModelFromRepositoryResponse()
    if status is not None:
        response.model.CopyFrom(responses.model_summary(status))
    return response


def unloaded(status: ModelStatus | None) -> ms.UnloadModelResponse:
    """The model with what is left of it; no model when it is gone."""
    response = ms.UnloadModelResponse()
    if status is not None:
        response.model.CopyFrom(responses.model_summary(status))
    return response


def default_set(status: ModelStatus | None) -> ms.SetDefaultVersionResponse:
    response = ms.SetDefaultVersionResponse()
    if status is not None:
        response.model.CopyFrom(responses.model_summary(status))
    return response
