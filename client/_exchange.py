"""What a call exchanges with the server, free of I/O: the faces only move its messages.

_calls.py describes each call as a Call (or, for analyze_many, a ManyCall). The sync face
(_client.py) and the asyncio face (aio.py) send it, feed the responses to `Attempts` or
`Window`, and ask them what to do next; every decision is taken here, once.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

import grpc

from gradtap.v1 import gradtap_pb2 as pb

from ._assemble import ManyAssembler, Step
from ._closing import Closing
from ._errors import GradtapError, from_rpc_error
from ._result import Aggregate, Result
from ._shm import Regions, SharedRegion

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
F = TypeVar("F", bound=Callable[..., Any])

OnStep = Callable[[int, float], Any]
"""Called with (step, loss) as each step's progress arrives."""


@dataclass(frozen=True)
class Method:
    """One RPC: its path, its kind (the channel's method that makes it) and its codecs."""

    path: str
    kind: Literal["unary_unary", "unary_stream", "stream_unary", "stream_stream"]
    serialize: Callable[[Any], bytes]
    deserialize: Callable[[bytes], Any]


class Assembler(Protocol[T_co]):
    """Turns a call's responses, fed in order, into its result."""

    def feed(self, message: Any) -> Step | None: ...

    def result(self) -> T_co: ...


@dataclass
class Call(Generic[T]):
    """One call with one request, answered by one response or a stream of them.

    Attributes:
        method: the RPC.
        request: the request message (an attempt may name a shared-memory region in it),
            or for a client-streaming method an iterable of them that each attempt iterates
            afresh.
        assemble: makes a fresh assembler for each attempt, writing into the attempt's
            shared-memory region (None without one).
        timeout: the call's deadline in seconds; None for the client's.
        resend: the call has no side effects, so a stream broken off by UNAVAILABLE after
            some responses (a replica died mid-stream) may be sent once more, from the start.
        model: the model's name, by which shared-memory sizes are remembered.
        shared_memory: where the server may write the result (see _shm.Regions).
        on_step: called with each progress step the assembler reports.
    """

    method: Method
    request: Any
    assemble: Callable[[SharedRegion | None], Assembler[T]]
    timeout: float | None = None
    resend: bool = False
    model: str = ""
    shared_memory: bool | SharedRegion = False
    on_step: OnStep | None = None


class Attempts(Closing, Generic[T]):
    """The attempts of one Call. Each `attempt()` starts a fresh assembler (in a fresh
    shared-memory region when the call made one); when an attempt fails, it decides whether
    to try again. gRPC's retry policy (_retry.py) retries a call until a response arrives;
    this adds the resend of a broken stream and the retry with a larger shared-memory
    region. A partial result is never returned.

        with Attempts(call, retries, sizes) as attempts:
            while True:
                with attempts.attempt() as request:
                    ... send request; attempts.feed(each response) ...
                    return attempts.result()
    """

    def __init__(self, call: Call[T], retries: int, region_sizes: dict[str, int]) -> None:
        self._call = call
        self._resends = 1 if call.resend and retries > 0 else 0
        self._regions = (
            None
            if call.shared_memory is False
            else Regions(call.shared_memory, region_sizes, call.model)
        )
        self._assembler: Assembler[T] | None = None
        self._received = 0

    def close(self) -> None:
        """Removes a shared-memory region made for the call; its arrays live on."""
        if self._regions is not None:
            self._regions.close()

    @contextmanager
    def attempt(self) -> Iterator[Any]:
        """One attempt: yields the request to send. A grpc.RpcError that ends the block is
        swallowed when the call is to be sent again, else raised as a GradtapError."""
        region = None if self._regions is None else self._regions.open(self._call.request)
        self._assembler = self._call.assemble(region)
        self._received = 0
        try:
            yield self._call.request
        except grpc.RpcError as e:
            error = self._failed(e)
            if error is not None:
                raise error from None

    def feed(self, message: Any) -> Any:
        """Takes one response. A progress step goes to the call's on_step, whose reply
        (an awaitable, for the asyncio client) is returned."""
        assert self._assembler is not None
        self._received += 1
        step = self._assembler.feed(message)
        if step is not None and self._call.on_step is not None:
            return self._call.on_step(*step)
        return None

    def result(self) -> T:
        """The complete result; GradtapError(DATA_LOSS) if the responses were incomplete."""
        assert self._assembler is not None
        return self._assembler.result()

    def _failed(self, error: grpc.RpcError) -> GradtapError | None:
        """None to send the call again after `error`; else the GradtapError to raise."""
        code = error.code() if callable(getattr(error, "code", None)) else None
        if self._resends and self._received and code == grpc.StatusCode.UNAVAILABLE:
            self._resends -= 1
            return None
        converted = from_rpc_error(error)
        if self._regions is not None and self._regions.grow(converted):
            return None
        return converted


@dataclass
class ManyCall:
    """An analyze_many stream: requests read lazily, results assembled in item order."""

    method: Method
    requests: Iterator[pb.AnalyzeManyRequest]
    assembler: ManyAssembler
    max_in_flight: int
    aggregate: bool
    timeout: float | None = None


class Window:
    """The flow of an analyze_many stream: `max_in_flight` items are sent, then one more
    for each result that comes back, so at most that many are ever unanswered and items are
    read (and encoded) only when they are about to go out."""

    def __init__(self, call: ManyCall) -> None:
        self.call = call
        self.sent = 0
        self.exhausted = False
        self.finished = False
        self.aggregate: Aggregate | None = None

    def sends(self, count: int) -> list[pb.AnalyzeManyRequest | None]:
        """The next `count` requests to write; None, once, for "no more"."""
        out: list[pb.AnalyzeManyRequest | None] = []
        while len(out) < count and not self.exhausted:
            request = next(self.call.requests, None)
            out.append(request)
            if request is None:
                self.exhausted = True
            else:
                self.sent += 1
        return out

    def opening(self) -> list[pb.AnalyzeManyRequest | None]:
        """The requests to write when the stream opens."""
        return self.sends(self.call.max_in_flight)

    def take(self, message: Any) -> tuple[Result | None, list[pb.AnalyzeManyRequest | None]]:
        """Feeds one response: an item's result when it completed one, and what to write."""
        result = self.call.assembler.feed(message)
        return result, [] if result is None else self.sends(1)

    def finish(self) -> None:
        """The responses ended: checks that every item and the aggregate came back whole."""
        self.aggregate = self.call.assembler.finish(self.sent, self.call.aggregate)
        self.finished = True

    @contextmanager
    def running(self, rpc: Any) -> Iterator[None]:
        """The stream's life: a grpc.RpcError becomes a GradtapError, and the call is
        cancelled when it did not end with its last item (the caller stopped early)."""
        try:
            yield
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            if not self.finished:
                rpc.cancel()


class Streamed:
    """What ResultStream and AsyncResultStream share: their stream's Window, and its
    aggregate once the stream ended."""

    def __init__(self, call: ManyCall) -> None:
        self._window = Window(call)

    @property
    def aggregate(self) -> Aggregate | None:
        """The Aggregate (with aggregate=True), or None without it or for no items.

        Raises:
            RuntimeError: the stream has not been iterated to its end yet; the aggregate
                arrives after the last result.
        """
        window = self._window
        if window.call.aggregate and not window.finished:
            raise RuntimeError("the aggregate arrives after the last result: iterate to the end")
        return window.aggregate


def result_type(builder: Callable[..., Any]) -> str:
    """What a face's method returns for a builder, as help() shows it: T for Call[T]."""
    returned = str(inspect.signature(builder).return_annotation)
    match = re.fullmatch(r"Call\[(.*)\]", returned)
    return match.group(1) if match else returned


def face_method(builder: Callable[..., Any], method: F, returns: Any) -> F:
    """`method` dressed as `builder` for help(), inspect and IDEs: the builder's name,
    docstring and parameters after `self`, returning `returns`."""
    functools.update_wrapper(method, builder)
    signature = inspect.signature(builder)
    self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[self, *signature.parameters.values()], return_annotation=returns
    )
    return method
