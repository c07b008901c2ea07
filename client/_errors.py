"""One exception type for every failure, converted from gRPC errors in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """A request field the server refused, and why."""

    field: str
    description: str


@dataclass(frozen=True)
class ErrorDetails:
    """The structured part of a server error (google.rpc.Status details)."""

    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: list[FieldViolation] = field(default_factory=list)
    retry_delay: float | None = None


class GradtapError(Exception):
    """A failed gradtap call.

    Attributes:
        code: the grpc.StatusCode, e.g. INVALID_ARGUMENT or NOT_FOUND.
        message: the server's human-readable message.
        details: reason, offending fields and retry hints, when the server sent them.
    """

    def __init__(
        self, code: grpc.StatusCode, message: str, details: ErrorDetails | None = None
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.details = details or ErrorDetails()

    @property
    def reason(self) -> str:
        """The UPPER_SNAKE reason, e.g. "UNKNOWN_TARGET"; empty when not given."""
        return self.details.reason

    @property
    def field(self) -> str | None:
        """The first offending request field, e.g. "targets[2].name"."""
        violations = self.details.field_violations
        return violations[0].field if violations else None


_REASON_IN_MESSAGE = re.compile(r"\(([A-Z][A-Z0-9_]{2,63})\)$")


def _details(metadata: object, message: str = "") -> ErrorDetails:
    raw = None
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == _DETAILS_KEY:
            raw = value
    if raw is None:
        # A call the server cut while blocked (a stalled reader) carries its reason only at
        # the end of its message: the status details could not be sent behind unread data.
        named = _REASON_IN_MESSAGE.search(message)
        return ErrorDetails(named.group(1) if named else "")
    status = status_pb2.Status.FromString(raw)
    reason, domain, meta = "", "", {}
    violations: list[FieldViolation] = []
    retry_delay = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, meta = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
    return ErrorDetails(reason, domain, meta, violations, retry_delay)


def from_rpc_error(error: grpc.RpcError) -> GradtapError:
    """Converts a sync or asyncio gRPC error into a GradtapError."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    trailing = (
        error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else ()
    )
    return GradtapError(code, details or "", _details(trailing, details or ""))
