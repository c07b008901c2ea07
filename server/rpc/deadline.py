"""Every admitted call is bounded in time, wherever it is: the server's maximum call
duration, and the stall bound of a reader that stopped reading.

The admission interceptor (rpc/admission.py) sets a call's end when it admits it, counted
from the call's arrival, and hands the call to the `Watchdog`. Inside the engine the end is
the should_stop that `time_limit` yields, checked between operators and between Captum's
batches, so a stopped call frees its compute thread. Outside the engine (blocked sending to
a client that does not read, or waiting for a client's next request) the watchdog cuts the
call: past its end, or `stall_seconds` after a message was handed to gRPC and not taken by
the reader. A cut call ends with DEADLINE_EXCEEDED; its handler, its place and what it held
are released at once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import grpc

from ..errors import Cancelled, DeadlineExceeded

CALL_TOO_LONG = "CALL_TOO_LONG"
READER_STALLED = "READER_STALLED"

_ends: ContextVar[float | None] = ContextVar("gradtap_call_ends", default=None)
"""time.monotonic() at which the server ends the running call; None outside admitted calls."""

_GRACE = 1.0
"""Seconds past a call's end before the watchdog cuts it: the handler's own checks (between
operators and messages) get the first chance, and end it with the full status details."""

_TOO_LONG = (
    "the call ran past the server's maximum call duration (gradtap serve "
    "--max-call-seconds); send a smaller request or ask the operator to raise the limit"
)


def set_end(ends: float | None) -> None:
    """Sets (or, with None, clears) the end of the call the current thread serves."""
    _ends.set(ends)


def too_long() -> DeadlineExceeded:
    """The error of a call stopped by the server's maximum call duration."""
    return DeadlineExceeded(_TOO_LONG, reason=CALL_TOO_LONG)


@contextmanager
def time_limit(context: grpc.ServicerContext) -> Iterator[Callable[[], bool]]:
    """Yields the engine's should_stop for this call: true once the caller went away or the
    call ran past the server's maximum duration.

    A Cancelled raised inside the block because of that limit leaves it as DeadlineExceeded.
    Outside an admitted call (no admission interceptor) only the caller's going away counts.
    """
    ends = _ends.get()
    # The engine asks between every two operators: an event set when the call ends costs a
    # third of asking grpc (context.is_active takes the call's lock) each time.
    gone = threading.Event()
    if not context.add_callback(gone.set):
        gone.set()  # the call has already ended

    def expired() -> bool:
        return ends is not None and time.monotonic() >= ends

    def should_stop() -> bool:
        return gone.is_set() or expired()

    try:
        yield should_stop
    except Cancelled:
        if expired():
            raise too_long() from None
        raise


def cut(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """Ends a call from any thread, with `code` and `message`, even while its handler is
    blocked in gRPC (sending to a reader that does not read): the handler's send fails, the
    call's callbacks run, and messages not yet read are dropped.

    gRPC's public API cancels only with CANCELLED and no message, and abort() works only
    from the handler's thread and waits behind unsent messages; core's cancel-with-status
    does what is needed, so it is used when the context exposes it.
    """
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    if call is None:
        context.cancel()
    else:
        call.cancel(code.value[0], message)


@dataclass(eq=False)
class Watched:
    """An admitted call the watchdog keeps an eye on."""

    context: grpc.ServicerContext
    ends: float
    sending_since: float | None = None
    """When the handler handed gRPC a message that has not been taken yet; None otherwise."""
    cut_for: str = ""
    """The reason the watchdog cut the call, once it did."""

    def sending(self) -> None:
        self.sending_since = time.monotonic()

    def sent(self) -> None:
        self.sending_since = None


class Watchdog:
    """Cuts admitted calls past their end, and calls whose reader stalled, from a thread of
    its own that runs while any call is watched."""

    def __init__(self, stall_seconds: float) -> None:
        if not stall_seconds > 0:
            raise ValueError("stall_seconds must be more than 0")
        self.stall_seconds = stall_seconds
        self.tick = min(0.25, stall_seconds / 8)
        self.cuts: Counter[str] = Counter()
        """Calls cut, by reason."""
        self._lock = threading.Lock()
        self._calls: set[Watched] = set()
        self._thread: threading.Thread | None = None

    def watch(self, context: grpc.ServicerContext, ends: float) -> Watched:
        """Starts watching a call; `forget` it when its handler is done."""
        watched = Watched(context, ends)
        with self._lock:
            self._calls.add(watched)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="gradtap-watchdog", daemon=True
                )
                self._thread.start()
        return watched

    def forget(self, watched: Watched) -> None:
        with self._lock:
            self._calls.discard(watched)

    def _run(self) -> None:
        while True:
            time.sleep(self.tick)
            with self._lock:
                if not self._calls:
                    self._thread = None
                    return
                calls = list(self._calls)
            now = time.monotonic()
            for watched in calls:
                self._check(watched, now)

    def _check(self, watched: Watched, now: float) -> None:
        if watched.cut_for:
            return
        since = watched.sending_since
        if now >= watched.ends + _GRACE:
            watched.cut_for = CALL_TOO_LONG
            message = f"{_TOO_LONG} ({CALL_TOO_LONG})"
        elif since is not None and now - since >= self.stall_seconds:
            watched.cut_for = READER_STALLED
            message = (
                f"the client read nothing of this call's results for {self.stall_seconds:g} s, "
                "so the server ended it and gave its place to others (gradtap serve "
                f"--stall-seconds) ({READER_STALLED})"
            )
        else:
            return
        self.cuts[watched.cut_for] += 1
        cut(watched.context, grpc.StatusCode.DEADLINE_EXCEEDED, message)
