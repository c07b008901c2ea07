"""The synchronous client: the calls of _calls.py, sent with grpc's blocking API."""

from __future__ import annotations

import queue
from collections.abc import Callable, Generator, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from gradtap.v1 import gradtap_pb2 as pb

from . import _calls, _control, _language
from ._channel import Connection
from ._closing import Closing
from ._exchange import Attempts, Call, ManyCall, Streamed, face_method, result_type
from ._result import Result

P = ParamSpec("P")
T = TypeVar("T")


class ResultStream(Streamed, Closing):
    """The results of Client.analyze_many: an iterator of Result, one per item, in order.

    The stream starts on the first `next()`. Breaking out early, `close()`, or leaving a
    `with` block cancels it. `aggregate` holds the job's Aggregate once the last result
    was taken.
    """

    def __init__(self, start: Callable[[Iterator[pb.AnalyzeManyRequest]], Any], call: ManyCall):
        super().__init__(call)
        self._results = self._run(start)

    def __iter__(self) -> ResultStream:
        return self

    def __next__(self) -> Result:
        return next(self._results)

    def close(self) -> None:
        """Cancels the stream if it is still running."""
        self._results.close()

    def _run(
        self, start: Callable[[Iterator[pb.AnalyzeManyRequest]], Any]
    ) -> Generator[Result, None, None]:
        # gRPC reads the requests on its own thread; this one hands them over only when the
        # window says so, so the caller's items are read and encoded here, one at a time.
        outbox: queue.SimpleQueue[pb.AnalyzeManyRequest | None] = queue.SimpleQueue()
        window = self._window
        rpc = start(iter(outbox.get, None))
        with window.running(rpc):
            try:
                for request in window.opening():
                    outbox.put(request)
                for message in rpc:
                    result, requests = window.take(message)
                    for request in requests:
                        outbox.put(request)
                    if result is not None:
                        yield result
                window.finish()
            finally:
                if not window.exhausted:
                    outbox.put(None)  # ends gRPC's reading of the requests


def _call(builder: Callable[P, Call[T]]) -> Callable[Concatenate[Client, P], T]:
    """A Client method that sends the call `builder` describes and returns its result."""

    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(builder(*args, **kwargs))

    return face_method(builder, method, result_type(builder))


def _streamed(builder: Callable[P, ManyCall]) -> Callable[Concatenate[Client, P], ResultStream]:
    """A Client method that opens the stream `builder` describes."""

    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> ResultStream:
        call = builder(*args, **kwargs)
        return ResultStream(
            lambda requests: self._invoke(call.method, requests, call.timeout), call
        )

    return face_method(builder, method, "ResultStream")


class Client(Connection, Closing):
    """A connection to a gradtap server, with one blocking method per call of the service.

    Client(address="127.0.0.1:50051", *, timeout=None, token=None, ...): see __init__ for
    the arguments. A context manager: leaving it closes the channel.
    """

    def _open(
        self, address: str, tls: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> grpc.Channel:
        if tls is None:
            return grpc.insecure_channel(address, options)
        return grpc.secure_channel(address, tls, options)

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def _run(self, call: Call[T]) -> T:
        with Attempts(call, self._retries, self._region_sizes) as attempts:
            while True:
                with attempts.attempt() as request:
                    rpc = self._invoke(call.method, request, call.timeout)
                    if call.method.kind in ("unary_unary", "stream_unary"):
                        attempts.feed(rpc)  # the blocking call returned the response
                    else:
                        try:
                            for message in rpc:
                                attempts.feed(message)
                        finally:
                            rpc.cancel()  # a no-op once the stream ended; else stops it
                    return attempts.result()

    list_models = _call(_calls.list_models)
    describe = _call(_calls.describe)
    health = _call(_calls.health)
    analyze = _call(_calls.analyze)
    analyze_many = _streamed(_calls.analyze_many)
    attribute = _call(_calls.attribute)
    perturb = _call(_calls.perturb)
    load_model = _call(_control.load_model)
    load_model_from_repository = _call(_control.load_model_from_repository)
    unload_model = _call(_control.unload_model)
    set_default_version = _call(_control.set_default_version)
    attribute_tokens = _call(_language.attribute_tokens)
    attribution_patching = _call(_language.attribution_patching)
