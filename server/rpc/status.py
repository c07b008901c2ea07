"""Exceptions to gRPC status, in one place: every RPC and interceptor ends a failed call here.

A RequestError (server/errors.py) becomes a google.rpc.Status with an ErrorInfo (its reason,
in the domain gradtap.v1) and, for a bad field, a BadRequest.FieldViolation; anything else is
a bug, logged, and answered with a bare INTERNAL. Request bytes that do not parse are
answered like any other bad request (see `lenient`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..errors import Cancelled, InvalidArgument, Kind, RequestError

log = logging.getLogger(__name__)

ERROR_DOMAIN = "gradtap.v1"

_CODES = {
    Kind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Kind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.CANCELLED: grpc.StatusCode.CANCELLED,
    Kind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Kind.INTERNAL: grpc.StatusCode.INTERNAL,
    Kind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Kind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(error: RequestError) -> grpc.Status:
    """A google.rpc.Status with ErrorInfo and, for a bad field, a BadRequest violation."""
    code = _CODES[error.kind]
    details = []
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
        )
    )
    details.append(info)
    if error.field:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=error.field, description=error.message
                    )
                ]
            )
        )
        details.append(bad)
    message = status_pb2.Status(code=code.value[0], message=error.message, details=details)
    return rpc_status.to_status(message)


_INTERNAL = RequestError("internal error; the server logged the details", reason="INTERNAL")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Unparseable:
    """Stands in for request bytes that are not the method's request message."""

    message_type: str


def lenient(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises.

    grpcio answers bytes its deserializer rejects with a bare INTERNAL, no details, and
    (grpcio 1.85) keeps about 20 KiB of memory per such call. This one hands the servicer
    a marker instead, which `status_mapped` answers with a documented INVALID_ARGUMENT.
    """

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Unparseable(message_type.DESCRIPTOR.full_name)

    return parse


def _parsed(request: Any) -> Any:
    if isinstance(request, Unparseable):
        raise InvalidArgument(
            f"the request bytes are not a valid {request.message_type}",
            reason="MALFORMED_REQUEST",
        )
    return request


def _parsed_stream(requests: Iterator[Any]) -> Iterator[Any]:
    """The request stream, each message parsed; a caller that goes away mid-stream is a
    cancellation, not a bug."""
    try:
        for request in requests:
            yield _parsed(request)
    except grpc.RpcError:
        raise Cancelled("the call was cancelled", reason="CANCELLED") from None


def _drop_frames(error: BaseException | None) -> None:
    """Clears the local variables of the finished frames an error passed through.

    A call stopped mid-computation (cancelled, past its deadline) raises from deep in the
    engine or in Captum, and those frames hold the call's tensors: gigabytes, for a heavy
    call. The aborting status keeps the error as its context, and frames and errors form
    cycles that only the cyclic garbage collector frees, which an idle server may not run
    for minutes. Clearing the frames gives the memory back when the call ends.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def status_mapped(method: F) -> F:
    """Turns RequestError into its status and any other exception into a generic INTERNAL.

    Requests that did not parse (see `lenient`) never reach the method.
    """

    def abort(context: grpc.ServicerContext, error: Exception) -> None:
        if not isinstance(error, RequestError):
            log.exception("bug while serving %s", method.__name__)
        _drop_frames(error)
        context.abort_with_status(
            status_for(error if isinstance(error, RequestError) else _INTERNAL)
        )

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                if isinstance(request, Iterator):
                    request = _parsed_stream(request)
                yield from method(self, _parsed(request), context)
            except Exception as e:  # noqa: BLE001 - mapped to a status right here
                abort(context, e)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            if isinstance(request, Iterator):
                request = _parsed_stream(request)
            return method(self, _parsed(request), context)
        except Exception as e:  # noqa: BLE001 - mapped to a status right here
            abort(context, e)

    return unary  # type: ignore[return-value]
