"""analyze_many: many inputs over one AnalyzeMany stream, a bounded number in flight, in order."""

from __future__ import annotations

import queue
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from gradtap.v1 import gradtap_pb2 as pb

from ._errors import GradtapError, from_rpc_error
from ._objective import Objective
from ._request import analyze_request
from ._result import Assembler, RawChunk, Result, _single_chunk
from ._target import TargetLike, as_float32

ObjectiveFor = Objective | Callable[[int], Objective | None] | None
"""One objective for every item, or a function of the item's position returning its own."""

_CHUNKS_TAG = (pb.AnalyzeManyResponse.DESCRIPTOR.fields_by_name["chunks"].number << 3) | 2


@dataclass
class Aggregate:
    """Running means over every item of an analyze_many job, computed on the server.

    Attributes:
        mean_gradients: target name -> the gradient averaged over every batch row of every
            item; shaped like one row (the target's shape without dimension 0).
        mean_abs_gradients: target name -> the mean of |gradient| per channel (dimension 1),
            over every other dimension of every item: shape (C,) for an (N, C, ...) target.
        items: how many items it averages over.
        rows: how many batch rows (dimension 0 of the inputs) it averages over.
        loss: the mean of the items' losses (NaN without an objective).
        metadata: model, model_digest, device, ... as Result.metadata has them.
    """

    mean_gradients: dict[str, np.ndarray] = field(default_factory=dict)
    mean_abs_gradients: dict[str, np.ndarray] = field(default_factory=dict)
    items: int = 0
    rows: int = 0
    loss: float = float("nan")
    metadata: dict[str, Any] = field(default_factory=dict)


def decode_many_response(data: bytes) -> pb.AnalyzeManyResponse | RawChunk:
    """The response deserializer: 1 MiB chunk messages skip protobuf's copy of their data."""
    return _single_chunk(data, _CHUNKS_TAG) or pb.AnalyzeManyResponse.FromString(data)


def many_options(
    aggregate: bool,
    per_item: bool,
    max_in_flight: int,
    input_grad: bool,
    activations: bool,
    outputs: bool,
    param_grads: Sequence[str],
) -> tuple[pb.AnalyzeManyOptions, dict[str, Any]]:
    """The stream's options and each item's flags; what per_item=False leaves out is not
    asked of the server at all."""
    if int(max_in_flight) != max_in_flight or max_in_flight < 1:
        raise ValueError("max_in_flight must be a positive integer")
    if not per_item and not aggregate:
        raise ValueError("per_item=False needs aggregate=True, or nothing would come back")
    options = pb.AnalyzeManyOptions(aggregate=aggregate, omit_items=not per_item)
    flags = {
        "input_grad": input_grad and per_item,
        "activations": activations and per_item,
        "outputs": outputs and per_item,
        "param_grads": param_grads if per_item else (),
    }
    return options, flags


def many_requests(
    model: str,
    batches: Iterable[Any],
    targets: Sequence[TargetLike],
    objective: ObjectiveFor,
    options: pb.AnalyzeManyOptions,
    **flags: Any,
) -> Iterator[pb.AnalyzeManyRequest]:
    """One request per item, encoded only when it is about to be sent."""
    for k, inputs in enumerate(batches):
        item_objective = (
            objective if objective is None or isinstance(objective, Objective) else objective(k)
        )
        item = analyze_request(model, inputs, targets, item_objective, **flags)
        yield pb.AnalyzeManyRequest(item=item, options=options if k == 0 else None)


def _broken(message: str) -> GradtapError:
    return GradtapError(grpc.StatusCode.DATA_LOSS, message)


class ManyAssembler:
    """Routes AnalyzeMany messages: each item's messages to its own Assembler, in order,
    then the aggregate's."""

    def __init__(self, model: str, targets: Sequence[TargetLike]) -> None:
        self._model = model
        self._targets = targets
        self._current: Assembler | None = None
        self._current_is_aggregate = False
        self._info: pb.AggregateInfo | None = None
        self._aggregate: Aggregate | None = None
        self.answered = 0

    def feed(self, message: pb.AnalyzeManyResponse | RawChunk) -> Result | None:
        """Takes the next message; returns an item's Result when its summary arrived."""
        if self._aggregate is not None:
            raise _broken("the stream went on after its aggregate")
        if isinstance(message, RawChunk):
            if self._current is None:
                raise _broken("chunks arrived outside an item")
            self._current.feed(message)
            return None
        if message.HasField("header"):
            if self._current is not None:
                raise _broken("a header arrived before the previous item's summary")
            self._current_is_aggregate = message.HasField("aggregate")
            if self._current_is_aggregate:
                self._info = message.aggregate
            elif message.index != self.answered:
                raise _broken(f"item {message.index} arrived where {self.answered} was due")
            self._current = Assembler(self._model)
        elif self._current is None:
            raise _broken("a message arrived outside an item")
        part = pb.AnalyzeResponse(chunks=message.chunks)
        if message.HasField("header"):
            part.header.CopyFrom(message.header)
        if message.HasField("summary"):
            part.summary.CopyFrom(message.summary)
        self._current.feed(part)
        if not message.HasField("summary"):
            return None
        done, self._current = self._current, None
        if self._current_is_aggregate:
            self._aggregate = self._build_aggregate(done)
            return None
        result = as_float32(done.result(), self._targets)
        result.metadata["item"] = self.answered
        self.answered += 1
        return result

    def _build_aggregate(self, done: Assembler) -> Aggregate:
        assert self._info is not None
        summary = done.result()
        aggregate = Aggregate(
            items=self._info.items,
            rows=self._info.rows,
            loss=summary.loss,
            metadata=summary.metadata,
        )
        for header, array in done.tensors():
            if header.role == pb.TENSOR_ROLE_MEAN_GRADIENT:
                aggregate.mean_gradients[header.name] = array
            elif header.role == pb.TENSOR_ROLE_MEAN_ABS_GRADIENT:
                aggregate.mean_abs_gradients[header.name] = array
        return aggregate

    def finish(self, sent: int, aggregate: bool) -> Aggregate | None:
        """Checks, at the stream's end, that every item and the aggregate came back whole."""
        if self._current is not None:
            raise _broken("the stream ended inside an item; the result is incomplete")
        if self.answered != sent:
            raise _broken(f"the stream ended after {self.answered} of {sent} items")
        if aggregate and sent and self._aggregate is None:
            raise _broken("the stream ended without its aggregate")
        return self._aggregate


class _Aggregating:
    """What the sync and async result streams share: the aggregate, once the stream ended."""

    def __init__(self, aggregate: bool) -> None:
        self._aggregate: Aggregate | None = None
        self._wants_aggregate = aggregate
        self._finished = False

    @property
    def aggregate(self) -> Aggregate | None:
        """The Aggregate (with aggregate=True), or None without it or for no items.

        Raises:
            RuntimeError: the stream has not been iterated to its end yet; the aggregate
                arrives after the last result.
        """
        if self._wants_aggregate and not self._finished:
            raise RuntimeError("the aggregate arrives after the last result: iterate to the end")
        return self._aggregate


class ResultStream(_Aggregating):
    """The results of Client.analyze_many: an iterator of Result, one per item, in order.

    The stream starts on the first `next()`. Breaking out early (or `close()`) cancels it.

    `aggregate` holds the job's Aggregate once the last result was taken.
    """

    def __init__(
        self,
        start: Callable[[Iterator[pb.AnalyzeManyRequest]], Any],
        requests: Iterator[pb.AnalyzeManyRequest],
        assembler: ManyAssembler,
        max_in_flight: int,
        aggregate: bool,
    ) -> None:
        super().__init__(aggregate)
        self._results = self._run(start, requests, assembler, max_in_flight, aggregate)

    def __iter__(self) -> ResultStream:
        return self

    def __next__(self) -> Result:
        return next(self._results)

    def __enter__(self) -> ResultStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Cancels the stream if it is still running."""
        self._results.close()

    def _run(
        self,
        start: Callable[[Iterator[pb.AnalyzeManyRequest]], Any],
        requests: Iterator[pb.AnalyzeManyRequest],
        assembler: ManyAssembler,
        max_in_flight: int,
        aggregate: bool,
    ) -> Generator[Result, None, None]:
        # gRPC reads the requests on its own thread; this one hands them over only when a
        # slot is free, so the caller's items are read and encoded here, one at a time.
        outbox: queue.SimpleQueue[pb.AnalyzeManyRequest | None] = queue.SimpleQueue()
        sent, exhausted, finished = 0, False, False

        def outgoing() -> Iterator[pb.AnalyzeManyRequest]:
            while (request := outbox.get()) is not None:
                yield request

        def send() -> None:
            nonlocal sent, exhausted
            if exhausted:
                return
            request = next(requests, None)
            if request is None:
                exhausted = True
                outbox.put(None)
            else:
                outbox.put(request)
                sent += 1

        call = start(outgoing())
        try:
            for _ in range(max_in_flight):
                send()
            for message in call:
                result = assembler.feed(message)
                if result is not None:
                    send()
                    yield result
            self._aggregate = assembler.finish(sent, aggregate)
            self._finished = finished = True
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            if not exhausted:
                outbox.put(None)
            if not finished:
                call.cancel()


class AsyncResultStream(_Aggregating):
    """The results of aio Client.analyze_many: an async iterator of Result, in item order.

    The stream starts on the first `__anext__()`. Leaving `async with` early (or `close()`)
    cancels it.

    `aggregate` holds the job's Aggregate once the last result was taken.
    """

    def __init__(
        self,
        start: Callable[[], Any],
        requests: Iterator[pb.AnalyzeManyRequest],
        assembler: ManyAssembler,
        max_in_flight: int,
        aggregate: bool,
    ) -> None:
        super().__init__(aggregate)
        self._results = self._run(start, requests, assembler, max_in_flight, aggregate)

    def __aiter__(self) -> AsyncResultStream:
        return self

    async def __anext__(self) -> Result:
        return await self._results.__anext__()

    async def __aenter__(self) -> AsyncResultStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancels the stream if it is still running."""
        await self._results.aclose()

    async def _run(
        self,
        start: Callable[[], Any],
        requests: Iterator[pb.AnalyzeManyRequest],
        assembler: ManyAssembler,
        max_in_flight: int,
        aggregate: bool,
    ) -> AsyncGenerator[Result, None]:
        call = start()
        sent, exhausted, finished = 0, False, False

        async def send() -> None:
            nonlocal sent, exhausted
            if exhausted:
                return
            request = next(requests, None)
            if request is None:
                exhausted = True
                await call.done_writing()
            else:
                await call.write(request)
                sent += 1

        try:
            for _ in range(max_in_flight):
                await send()
            while (message := await call.read()) is not grpc.aio.EOF:
                result = assembler.feed(message)
                if result is not None:
                    await send()
                    yield result
            self._aggregate = assembler.finish(sent, aggregate)
            self._finished = finished = True
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            if not finished:
                call.cancel()
