"""Domain exceptions of the server, the bottom layer: every layer raises them, and
rpc/status.py alone maps them to gRPC status codes."""

from __future__ import annotations

import enum


class Kind(enum.Enum):
    """What went wrong, in the terms of the request; each maps to one gRPC status code."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


class RequestError(Exception):
    """A request the server refuses, with a message safe to show the caller.

    `reason` is an UPPER_SNAKE machine-readable cause; `field` names the offending request
    field (e.g. "targets[2].name") when there is one; `metadata` holds machine-readable
    facts the caller can act on (sent as ErrorInfo.metadata).
    """

    kind = Kind.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        field: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.field = field
        self.metadata = metadata or {}


class InvalidArgument(RequestError):
    """The request is malformed or does not fit the model."""

    kind = Kind.INVALID_ARGUMENT


class NotFound(RequestError):
    """The named model does not exist."""

    kind = Kind.NOT_FOUND


class FailedPrecondition(RequestError):
    """The request is well formed but the server's state does not allow it (digest pin)."""

    kind = Kind.FAILED_PRECONDITION


class ResourceExhausted(RequestError):
    """The request would need more memory or capacity than the server grants."""

    kind = Kind.RESOURCE_EXHAUSTED


class Cancelled(RequestError):
    """The caller went away or its deadline passed; the work was abandoned."""

    kind = Kind.CANCELLED


class DeadlineExceeded(RequestError):
    """The call ran past the server's maximum call duration; the work was abandoned."""

    kind = Kind.DEADLINE_EXCEEDED


class Unauthenticated(RequestError):
    """The call carries no bearer token, or one the server does not know."""

    kind = Kind.UNAUTHENTICATED


class PermissionDenied(RequestError):
    """The call's token is valid but may not use the model it names."""

    kind = Kind.PERMISSION_DENIED


class ModelLoadError(Exception):
    """A model archive was refused at load time (operator-facing; never sent to clients)."""
