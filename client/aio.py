"""The asyncio client: gradtap.client.Client's methods, awaitable (the calls of _calls.py)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from gradtap.v1 import gradtap_pb2 as pb

from . import _calls, _control, _language
from ._channel import Connection
from ._closing import AsyncClosing
from ._errors import GradtapError
from ._exchange import Attempts, Call, ManyCall, Streamed, face_method, result_type
from ._objective import Objective
from ._result import Result

__all__ = ["AsyncResultStream", "Client", "GradtapError", "Objective", "Result"]

P = ParamSpec("P")
T = TypeVar("T")


class AsyncResultStream(Streamed, AsyncClosing):
    """The results of aio Client.analyze_many: an async iterator of Result, in item order.

    The stream starts on the first `__anext__()`. Leaving `async with` early (or `close()`)
    cancels it. `aggregate` holds the job's Aggregate once the last result was taken.
    """

    def __init__(self, start: Callable[[], Any], call: ManyCall) -> None:
        super().__init__(call)
        self._results = self._run(start)

    def __aiter__(self) -> AsyncResultStream:
        return self

    async def __anext__(self) -> Result:
        return await self._results.__anext__()

    async def close(self) -> None:
        """Cancels the stream if it is still running."""
        await self._results.aclose()

    async def _run(self, start: Callable[[], Any]) -> AsyncGenerator[Result, None]:
        window, rpc = self._window, start()

        async def write(requests: list[pb.AnalyzeManyRequest | None]) -> None:
            for request in requests:
                await (rpc.done_writing() if request is None else rpc.write(request))

        with window.running(rpc):
            await write(window.opening())
            while (message := await rpc.read()) is not grpc.aio.EOF:
                result, requests = window.take(message)
                await write(requests)
                if result is not None:
                    yield result
            window.finish()


def _call(
    builder: Callable[P, Call[T]],
) -> Callable[Concatenate[Client, P], Coroutine[Any, Any, T]]:
    """An aio Client method that sends the call `builder` describes; await its result."""

    async def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(builder(*args, **kwargs))

    return face_method(builder, method, result_type(builder))


def _streamed(
    builder: Callable[P, ManyCall],
) -> Callable[Concatenate[Client, P], AsyncResultStream]:
    """An aio Client method that opens the stream `builder` describes (not awaited)."""

    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> AsyncResultStream:
        call = builder(*args, **kwargs)
        return AsyncResultStream(lambda: self._invoke(call.method, None, call.timeout), call)

    return face_method(builder, method, "AsyncResultStream")


class Client(Connection, AsyncClosing):
    """An asyncio connection to a gradtap server: gradtap.client.Client's methods, awaitable
    (analyze_many returns an AsyncResultStream at once). An async context manager."""

    def _open(
        self, address: str, tls: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> grpc.aio.Channel:
        if tls is None:
            return grpc.aio.insecure_channel(address, options)
        return grpc.aio.secure_channel(address, tls, options)

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def _run(self, call: Call[T]) -> T:
        with Attempts(call, self._retries, self._region_sizes) as attempts:
            while True:
                with attempts.attempt() as request:
                    rpc = self._invoke(call.method, request, call.timeout)
                    try:
                        if call.method.kind in ("unary_unary", "stream_unary"):
                            attempts.feed(await rpc)
                        else:
                            async for message in rpc:
                                reply = attempts.feed(message)
                                if inspect.isawaitable(reply):  # an async on_step
                                    await reply
                        return attempts.result()
                    finally:
                        rpc.cancel()  # a no-op once the call ended; else stops it

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
