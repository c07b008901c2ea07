"""Admission control: a bounded queue in front of the expensive RPCs, and a maximum call duration.

At most `max_concurrent` calls of GradientService (all but ListModels and DescribeModel) run
at once; up to `max_queue` more wait for a place, first come, first served. A call that finds
the queue full is refused at once with RESOURCE_EXHAUSTED, a `google.rpc.RetryInfo` detail
and the `grpc-retry-pushback-ms` trailer that gRPC's built-in retry policy honours. Health
and reflection are never limited.

Every admitted call must finish within `max_call_seconds` of its arrival, whatever deadline
the client set (or none): the engine stops through `deadline.time_limit`, streams are cut
between messages, and a call blocked anywhere else is cut by the `deadline.Watchdog`, with
DEADLINE_EXCEEDED (reason CALL_TOO_LONG). A call whose reader took nothing for
`stall_seconds` is cut too (READER_STALLED): its place goes to the next caller.

When a stream is cut for stalling, the calls of its connection waiting for a place are
refused (RESOURCE_EXHAUSTED, READER_STALLED): HTTP/2 flow control is per connection too, so
behind its unread data they would stall as well. The connection then stays suspect for
SUSPECT_STALLS stall bounds: its waiting calls are served after everyone else's, and one
of them gives its place in a full queue to a caller from another connection. So a client
that opens many streams and reads none holds other callers up for about one stall bound,
not one per place.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gradtap.v1 import gradtap_pb2 as pb

from ..errors import Cancelled, RequestError, ResourceExhausted
from .deadline import READER_STALLED, Watchdog, set_end, too_long
from .handlers import behaviour_of, same_kind
from .observability import observe_queue
from .status import ERROR_DOMAIN, status_for

_SERVICE = pb.DESCRIPTOR.services_by_name["GradientService"].full_name
UNLIMITED_METHODS = frozenset((f"/{_SERVICE}/ListModels", f"/{_SERVICE}/DescribeModel"))
"""Cheap GradientService methods that are never queued."""

PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""Trailing metadata read by gRPC's retry policy: retry after this many ms; negative: don't."""

OVERLOADED = "SERVER_OVERLOADED"

_MIN_RETRY_DELAY = 0.1
_MAX_RETRY_DELAY = 10.0
_FIRST_GUESS = 1.0
_DEADLINE_SLACK = 1.0
SUSPECT_STALLS = 10
"""A connection stays suspect for this many stall bounds after a stream of it stalled."""
"""The mean call duration assumed before any call has ended, in seconds."""


def limited(method: str) -> bool:
    """Whether calls of `method` ("/package.Service/Method") go through admission."""
    return method.startswith(f"/{_SERVICE}/") and method not in UNLIMITED_METHODS


@dataclass(frozen=True)
class _Status(grpc.Status):  # type: ignore[misc]
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def overloaded_status(retry_delay: float, max_concurrent: int, max_queue: int) -> grpc.Status:
    """RESOURCE_EXHAUSTED with ErrorInfo, RetryInfo and the grpc-retry-pushback-ms trailer."""
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=OVERLOADED,
            domain=ERROR_DOMAIN,
            metadata={"max_concurrent_requests": str(max_concurrent), "max_queue": str(max_queue)},
        )
    )
    retry = any_pb2.Any()
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(round(retry_delay * 1e3))
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    message = status_pb2.Status(
        code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        message=(
            f"the server is at capacity ({max_concurrent} calls running, {max_queue} waiting); "
            f"retry in {retry_delay:.2f} s, or on another replica"
        ),
        details=[info, retry],
    )
    status = rpc_status.to_status(message)
    pushback = (PUSHBACK_KEY, str(round(retry_delay * 1e3)))
    return _Status(status.code, status.details, (*status.trailing_metadata, pushback))


def _abort(context: grpc.ServicerContext, status: grpc.Status) -> NoReturn:
    context.abort_with_status(status)
    raise AssertionError("abort_with_status returns only by raising")


def _no_retry(context: grpc.ServicerContext) -> None:
    """Tells gRPC's retry policy not to retry a RESOURCE_EXHAUSTED that is not an overload
    (a tensor or result over the limits, device memory): it would fail again.

    Like observability's request id, this is added after abort_with_status replaced the
    trailing metadata, so the status details stay.
    """
    if context.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return
    trailing = tuple(context.trailing_metadata() or ())
    if all(key != PUSHBACK_KEY for key, _ in trailing):
        context.set_trailing_metadata((*trailing, (PUSHBACK_KEY, "-1")))


@dataclass
class _Ticket:
    """A waiting call; `granted` is set under the lock when a place is handed to it."""

    wake: threading.Event = field(default_factory=threading.Event)
    granted: bool = False
    peer: str = ""
    evicted: bool = False
    """Taken out of a full queue for a caller from a connection that reads its results."""


class Admission(grpc.ServerInterceptor):  # type: ignore[misc]
    """Bounds the running and waiting calls of the expensive methods, and their duration.

    Waiting calls hold a server thread: the server's pool needs at least
    `max_concurrent + max_queue` threads for them, on top of those for the other calls
    (app.start sizes it so). Put this interceptor last (innermost), after authentication,
    so that refused callers never take a place.
    """

    def __init__(
        self,
        max_concurrent: int,
        max_queue: int,
        max_call_seconds: float,
        stall_seconds: float = 20.0,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent_requests must be at least 1")
        if max_queue < 0:
            raise ValueError("max_queue must be at least 0")
        if not max_call_seconds > 0:
            raise ValueError("max_call_seconds must be more than 0")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.max_call_seconds = max_call_seconds
        self.watchdog = Watchdog(stall_seconds)
        self._stalled: dict[str, float] = {}
        """Connection (peer) -> when a stream of it was last cut for stalling."""
        self._lock = threading.Lock()
        self._running = 0
        self._waiting: deque[_Ticket] = deque()
        # Mean duration of recent admitted calls, for the retry delay; None until one ends.
        self._mean_seconds: float | None = None

    @property
    def running(self) -> int:
        """Calls holding a place now."""
        return self._running

    def retry_delay(self) -> float:
        """When a refused call should come back: about when a place frees up (the mean call
        duration over the places), randomized up to twice that so that refused callers do
        not all return at once."""
        mean = self._mean_seconds if self._mean_seconds is not None else _FIRST_GUESS
        base = mean / self.max_concurrent
        return min(_MAX_RETRY_DELAY, max(_MIN_RETRY_DELAY, base * (1 + random.random())))

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        # Runs as the call arrives: its maximum duration counts from here.
        ends = time.monotonic() + self.max_call_seconds
        handler = continuation(handler_call_details)
        if handler is None or not limited(handler_call_details.method):
            return handler
        if handler.response_streaming:
            behaviour = self._streaming(behaviour_of(handler), ends)
        else:
            behaviour = self._unary(behaviour_of(handler), ends)
        return same_kind(handler, behaviour)

    # -- the handlers -----------------------------------------------------------------------

    def _unary(
        self, behaviour: Callable[[Any, grpc.ServicerContext], Any], ends: float
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            self._enter(context, ends, context.peer())
            admitted = time.monotonic()
            set_end(ends)
            watched = self.watchdog.watch(context, ends)
            try:
                return behaviour(request, context)
            except Exception:
                _no_retry(context)
                raise
            finally:
                self.watchdog.forget(watched)
                set_end(None)
                self._leave(admitted)

        return unary

    def _streaming(
        self, behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]], ends: float
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            peer = context.peer()  # once the call is cut, grpc no longer tells
            self._enter(context, ends, peer)
            admitted = time.monotonic()
            set_end(ends)
            watched = self.watchdog.watch(context, ends)
            responses = None
            try:
                responses = behaviour(request, context)
                for response in responses:
                    if time.monotonic() >= ends:
                        _abort(context, status_for(too_long()))
                    watched.sending()  # until gRPC has taken it, which a stalled reader stops
                    yield response
                    watched.sent()
            except Exception:
                _no_retry(context)
                raise
            finally:
                self.watchdog.forget(watched)
                close = getattr(responses, "close", None)
                if close is not None:
                    close()
                set_end(None)
                if watched.cut_for == READER_STALLED:
                    self._stalls(peer)
                self._leave(admitted)

        return stream

    # -- places -----------------------------------------------------------------------------

    def _enter(self, context: grpc.ServicerContext, ends: float, peer: str) -> None:
        """Returns once the call holds a place; otherwise ends the call (abort raises)."""
        with self._lock:
            if self._running < self.max_concurrent and not self._waiting:
                self._running += 1
                return
            ticket = _Ticket(peer=peer)
            full = len(self._waiting) >= self.max_queue and not self._evict_for(peer)
            if full:
                delay = self.retry_delay()
            else:
                self._waiting.append(ticket)
        if full:
            _abort(context, overloaded_status(delay, self.max_concurrent, self.max_queue))
        started = time.monotonic()
        try:
            admitted = self._wait(ticket, context, ends)
        finally:
            observe_queue(time.monotonic() - started)
        if admitted:
            return
        error: RequestError
        if ticket.evicted:
            error = ResourceExhausted(
                "another call on this connection read nothing of its results for "
                f"{self.watchdog.stall_seconds:g} s, so this one gave up its place in the "
                f"queue ({READER_STALLED}); read the results of every call you start",
                reason=READER_STALLED,
            )
        elif time.monotonic() >= ends:
            error = too_long()
        else:  # the caller went away or its own deadline passed: nobody reads this status
            error = Cancelled("the call ended while it waited for a place", reason="CANCELLED")
        _abort(context, status_for(error))

    def _wait(self, ticket: _Ticket, context: grpc.ServicerContext, ends: float) -> bool:
        """Waits for `ticket` to be granted; False when the call ended or ran out of time."""
        # The callback runs when the call ends for any reason: cancelled, its deadline passed
        # (gRPC then tells the client itself), finished. The timeout is the server's limit,
        # and a fallback a little after the client's deadline.
        if context.add_callback(ticket.wake.set):
            timeout = ends - time.monotonic()
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = min(timeout, remaining + _DEADLINE_SLACK)
            ticket.wake.wait(max(0.0, timeout))
        with self._lock:
            if not ticket.granted:
                if not ticket.evicted:
                    self._waiting.remove(ticket)
                return False
        if context.is_active():
            return True
        self._hand_on()
        return False

    def _leave(self, admitted: float) -> None:
        seconds = time.monotonic() - admitted
        with self._lock:
            mean = self._mean_seconds
            self._mean_seconds = seconds if mean is None else 0.8 * mean + 0.2 * seconds
        self._hand_on()

    def _stalls(self, peer: str) -> None:
        """Notes that a stream of connection `peer` was cut for stalling, and refuses the
        connection's waiting calls: behind its unread data they would stall too."""
        now = time.monotonic()
        with self._lock:
            if len(self._stalled) > 1024:  # forget the connections no longer suspect
                self._stalled = {p: t for p, t in self._stalled.items() if self._suspect(p, now)}
            self._stalled[peer] = now
            for ticket in [t for t in self._waiting if t.peer == peer]:
                self._waiting.remove(ticket)
                ticket.evicted = True
                ticket.wake.set()

    def _suspect(self, peer: str, now: float) -> bool:
        """Whether a stream of connection `peer` was cut for stalling lately (lock held)."""
        since = self._stalled.get(peer)
        return since is not None and now - since <= SUSPECT_STALLS * self.watchdog.stall_seconds

    def _evict_for(self, peer: str) -> bool:
        """Makes room in the full queue for a call from `peer`, unless it is suspect, by
        taking out the last waiting call of a suspect connection (lock held)."""
        now = time.monotonic()
        if self._suspect(peer, now):
            return False
        evicted = next((t for t in reversed(self._waiting) if self._suspect(t.peer, now)), None)
        if evicted is None:
            return False
        self._waiting.remove(evicted)
        evicted.evicted = True
        evicted.wake.set()
        return True

    def _hand_on(self) -> None:
        """Gives up a place: to the first waiting call of a connection that is not suspect,
        else to the first waiting call, or back to the pool."""
        with self._lock:
            if self._waiting:
                now = time.monotonic()
                ticket = next(
                    (t for t in self._waiting if not self._suspect(t.peer, now)), self._waiting[0]
                )
                self._waiting.remove(ticket)
                ticket.granted = True
                ticket.wake.set()
            else:
                self._running -= 1
