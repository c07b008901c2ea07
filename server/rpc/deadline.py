"""The server's maximum call duration: when it ends for the running call, and the engine's stop.

The admission interceptor (rpc/admission.py) sets the end when it admits a call, counted
from the call's arrival; `time_limit` turns it into the engine's should_stop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import grpc

from ..errors import Cancelled, DeadlineExceeded

CALL_TOO_LONG = "CALL_TOO_LONG"

_ends: ContextVar[float | None] = ContextVar("gradtap_call_ends", default=None)
"""time.monotonic() at which the server ends the running call; None outside admitted calls."""


def set_end(ends: float | None) -> None:
    """Sets (or, with None, clears) the end of the call the current thread serves."""
    _ends.set(ends)


def too_long() -> DeadlineExceeded:
    """The error of a call stopped by the server's maximum call duration."""
    return DeadlineExceeded(
        "the call ran past the server's maximum call duration (gradtap serve "
        "--max-call-seconds); send a smaller request or ask the operator to raise the limit",
        reason=CALL_TOO_LONG,
    )


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
