"""Thin gRPC adapter: protobuf in, engine call, chunks out; errors mapped to status in one place."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf import any_pb2, message_factory
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

from . import budget, deadline, many, method_wire, shm, wire
from .adversarial import perturb
from .attribution import attribute
from .batching import Batcher
from .engine import Analysis, Engine, Objective, Target
from .errors import FailedPrecondition, InvalidArgument, Kind, NotFound, RequestError
from .models import MODEL_NAME, Model, Registry, Spec
from .reduce import Reduction

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


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises.

    grpcio answers bytes its deserializer rejects with a bare INTERNAL, no details, and
    (grpcio 1.85) keeps about 20 KiB of memory per such call. This one hands the servicer
    a marker instead, which it answers with a documented INVALID_ARGUMENT.
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
    for request in requests:
        yield _parsed(request)


def _status_mapped(method: F) -> F:
    """Turns RequestError into its status and any other exception into a generic INTERNAL.

    Requests that did not parse (see _lenient) never reach the method.
    """

    def abort(context: grpc.ServicerContext, error: Exception) -> None:
        if isinstance(error, RequestError):
            context.abort_with_status(status_for(error))
        log.exception("bug while serving %s", method.__name__)
        context.abort_with_status(status_for(_INTERNAL))

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
            return method(self, _parsed(request), context)
        except Exception as e:  # noqa: BLE001 - mapped to a status right here
            abort(context, e)

    return unary  # type: ignore[return-value]


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_tensor_elements: int = 1 << 28
    max_result_bytes: int = 2 << 30
    shared_memory: bool = False
    """Whether callers on this host may have results written into their shared memory."""


_CAPTURES = {
    pb.CAPTURE_UNSPECIFIED: (False, True),
    pb.CAPTURE_GRADIENT: (False, True),
    pb.CAPTURE_ACTIVATION: (True, False),
    pb.CAPTURE_GRADIENT_AND_ACTIVATION: (True, True),
}
_PRECISIONS = {
    pb.PRECISION_UNSPECIFIED: False,
    pb.PRECISION_FULL: False,
    pb.PRECISION_BFLOAT16_AUTOCAST: True,
}
_REDUCTIONS = {
    pb.LOSS_REDUCTION_UNSPECIFIED: "mean",
    pb.LOSS_REDUCTION_MEAN: "mean",
    pb.LOSS_REDUCTION_SUM: "sum",
}


Behaviour = Callable[[Any, grpc.ServicerContext], Any]
"""A handler's function: a request (or an iterator of them) and the context in."""

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
"""(request streaming, response streaming) -> grpc's factory for that kind of handler."""


def behaviour_of(handler: grpc.RpcMethodHandler) -> Behaviour:
    """The function a handler runs, whatever its kind."""
    behaviour: Behaviour = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    return behaviour


def same_kind(handler: grpc.RpcMethodHandler, behaviour: Behaviour) -> grpc.RpcMethodHandler:
    """A handler like `handler` (same streaming kind and serializers) running `behaviour`."""
    make = _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    made: grpc.RpcMethodHandler = make(
        behaviour, handler.request_deserializer, handler.response_serializer
    )
    return made


def add_to_server(servicer: pb_grpc.GradientServiceServicer, server: grpc.Server) -> None:
    """Registers every RPC of GradientService, built from the service descriptor.

    Unlike the generated add_GradientServiceServicer_to_server, responses may also be
    pre-encoded bytes (see wire.encode_chunk), which spares a copy of every tensor chunk.
    """
    service = pb.DESCRIPTOR.services_by_name["GradientService"]
    handlers = {}
    for method in service.methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        factory = _FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=_lenient(request_type),
            response_serializer=wire.serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


class _Releaser:
    """Frees results on a thread of its own, once their call has ended.

    Freeing a big tensor costs about 15 ms per 256 MiB (the pages go back to the kernel).
    Done by the handler, that would sit between a call's last message and its status, which
    is when the client's call completes.

    Only this thread may drop the last reference: gRPC runs call callbacks on its polling
    thread, and a tensor freed there can race the interpreter's exit (a thread that frees a
    tensor during finalization aborts the process). `close()` frees what is left and stops
    the thread before the server process exits.
    """

    _STOP = object()

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="gradtap-release", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            value = self._queue.get()
            if value is self._STOP:
                return
            del value

    def free_after_call(self, context: grpc.ServicerContext, value: object) -> None:
        """Holds `value` until the call has ended, then frees it on this thread."""
        box = [value]
        if not context.add_callback(lambda: self._queue.put(box.pop())):
            box.clear()  # the call has already ended

    def close(self, timeout: float = 10.0) -> None:
        """Frees what is waiting and stops the thread."""
        self._queue.put(self._STOP)
        self._thread.join(timeout)


def replica_id() -> str:
    """This process, as "<host>:<pid>"."""
    return f"{socket.gethostname()}:{os.getpid()}"


class GradientServicer(pb_grpc.GradientServiceServicer):
    """Implements gradtap.v1.GradientService over a registry of models and an engine."""

    def __init__(
        self,
        registry: Registry,
        engine: Engine,
        limits: Limits | None = None,
        batcher: Batcher | None = None,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.run = batcher.analyze if batcher is not None else engine.analyze
        self.limits = limits or Limits()
        self.replica = replica_id()
        self._releaser = _Releaser()

    def close(self) -> None:
        """Releases what finished calls left behind; call it once the server has stopped."""
        self._releaser.close()

    @_status_mapped
    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[_summary(m) for m in self.registry])

    @_status_mapped
    def DescribeModel(
        self, request: pb.DescribeModelRequest, context: grpc.ServicerContext
    ) -> pb.DescribeModelResponse:
        model = self._model(request.model)
        return pb.DescribeModelResponse(
            model=_summary(model),
            inputs=[_spec(s) for s in model.inputs],
            outputs=[_spec(s) for s in model.outputs],
            nodes=[
                pb.GraphNode(
                    name=n.name, op=n.op, spec=_spec(n.spec), differentiable=n.differentiable
                )
                for n in model.nodes.values()
            ],
            modules=[
                pb.ModuleOutput(path=path, type=mtype, node=node)
                for path, (mtype, node) in model.modules.items()
            ],
            parameters=[name for name, _, is_param in model.state if is_param],
        )

    @_status_mapped
    def Analyze(
        self, request: pb.AnalyzeRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:  # messages, or pre-encoded chunk messages (bytes)
        started = time.perf_counter()
        model = self._model(request.model)
        analysis = self._analysis(request)
        self.engine.check_inputs(model, analysis.inputs)
        sizes = budget.check(model, analysis, self.limits.max_result_bytes)
        opened = (
            self._region(request, sizes, context)
            if request.HasField("shared_memory")
            else contextlib.nullcontext()
        )
        with opened as region:
            decode_ms = (time.perf_counter() - started) * 1e3
            with deadline.time_limit(context) as should_stop:
                outcome = self.run(model, analysis, should_stop=should_stop)
            self._releaser.free_after_call(context, outcome)
            timings = dict(outcome.timings, decode_ms=decode_ms)
            timings["total_ms"] = (time.perf_counter() - started) * 1e3
            summary = pb.AnalyzeSummary(
                loss=outcome.loss,
                model_digest=model.digest,
                device=outcome.device,
                timings=pb.Timings(**timings),
                torch_version=torch.__version__,
                replica=self.replica,
                tensor_count=len(outcome.tensors),
                batch_size=outcome.batch_size,
                precision=outcome.precision,
            )
            header = wire.header(outcome.tensors)
            if region is not None:
                offsets = region.write(list(wire.on_host([c.tensor for c in outcome.tensors])))
                header.shared_memory = True
                for tensor, offset in zip(header.tensors, offsets):
                    tensor.region_offset = offset
                yield pb.AnalyzeResponse(header=header, summary=summary)
                return
        yield from wire.frames(outcome.tensors, pb.AnalyzeResponse(header=header), summary)

    def _region(
        self, request: pb.AnalyzeRequest, sizes: list[int], context: grpc.ServicerContext
    ) -> contextlib.AbstractContextManager[shm.Region]:
        """Checks the caller's shared-memory region before any work, and opens it; `sizes`
        are the result's estimated tensor bytes."""
        ask = shm.RegionRequest(
            name=request.shared_memory.name,
            size=request.shared_memory.size,
            token=request.shared_memory.token,
        )
        shm.check_request(
            ask, enabled=self.limits.shared_memory, local=shm.is_local(context.peer())
        )
        _, needed = shm.layout(sizes)
        if needed > ask.size:
            raise shm.too_small(ask, needed)
        return shm.opened(ask)

    @_status_mapped
    def AnalyzeMany(
        self, requests: Iterator[pb.AnalyzeManyRequest], context: grpc.ServicerContext
    ) -> Iterator[Any]:  # messages, or pre-encoded chunk messages (bytes)
        stream_started = time.perf_counter()
        options = pb.AnalyzeManyOptions()
        aggregator: many.Aggregator | None = None
        model: Model | None = None
        device, precision = str(self.engine.device), ""
        for k, request in enumerate(many.received(requests)):
            started = time.perf_counter()
            if k == 0:
                options = request.options
                if options.omit_items and not options.aggregate:
                    raise InvalidArgument(
                        "omit_items sends nothing back without aggregate",
                        reason="BAD_OPTIONS",
                        field="options.omit_items",
                    )
                aggregator = many.Aggregator() if options.aggregate else None
            with many.item(k):
                item_model = self._model(request.item.model)
                if model is not None and item_model is not model:
                    raise InvalidArgument(
                        f"every item must name the model of the first, {model.name!r}",
                        reason="MODEL_CHANGED",
                        field="model.name",
                    )
                model = item_model
                analysis = self._analysis(request.item)
                self.engine.check_inputs(model, analysis.inputs)
                budget.check(model, analysis, self.limits.max_result_bytes)
                if aggregator is not None:
                    aggregator.check(analysis)
                decode_ms = (time.perf_counter() - started) * 1e3
                outcome = self.engine.analyze(
                    model, analysis, should_stop=lambda: not context.is_active()
                )
                if aggregator is not None:
                    aggregator.add(analysis, outcome)
            device, precision = outcome.device, outcome.precision
            tensors = [] if options.omit_items else outcome.tensors
            timings = dict(outcome.timings, decode_ms=decode_ms)
            timings["total_ms"] = (time.perf_counter() - started) * 1e3
            summary = self._many_summary(model, device, outcome.loss, timings, len(tensors))
            summary.precision = precision
            first = pb.AnalyzeManyResponse(index=k, header=wire.header(tensors))
            yield from many.indexed(wire.frames(tensors, first, summary), k)
        if aggregator is not None and model is not None:
            tensors = aggregator.collected()
            total_ms = (time.perf_counter() - stream_started) * 1e3
            summary = self._many_summary(
                model, device, aggregator.loss, {"total_ms": total_ms}, len(tensors)
            )
            summary.precision = precision
            first = pb.AnalyzeManyResponse(
                index=aggregator.items,
                header=wire.header(tensors),
                aggregate=pb.AggregateInfo(items=aggregator.items, rows=aggregator.rows),
            )
            yield from many.indexed(wire.frames(tensors, first, summary), aggregator.items)

    def _many_summary(
        self, model: Model, device: str, loss: float, timings: dict[str, float], count: int
    ) -> pb.AnalyzeSummary:
        return pb.AnalyzeSummary(
            loss=loss,
            model_digest=model.digest,
            device=device,
            timings=pb.Timings(**timings),
            torch_version=torch.__version__,
            replica=self.replica,
            tensor_count=count,
            batch_size=1,
        )

    # -- decoding ---------------------------------------------------------------------------

    def _model(self, ref: pb.Model) -> Model:
        if not ref.name:
            raise InvalidArgument(
                "model.name is required", reason="MISSING_MODEL", field="model.name"
            )
        if not MODEL_NAME.fullmatch(ref.name):
            raise InvalidArgument(
                f"model.name must match {MODEL_NAME.pattern}",
                reason="BAD_MODEL_NAME",
                field="model.name",
            )
        model = self.registry.get(ref.name)
        if model is None:
            raise NotFound(
                f"no model named {ref.name!r}", reason="MODEL_NOT_FOUND", field="model.name"
            )
        if ref.digest and ref.digest != model.digest:
            raise FailedPrecondition(
                f"model {ref.name!r} has digest {model.digest}, not the pinned {ref.digest[:80]}",
                reason="DIGEST_MISMATCH",
                field="model.digest",
            )
        return model

    def _tensor(self, message: pb.Tensor, field: str) -> torch.Tensor:
        return wire.decode(message, field, self.limits.max_tensor_elements)

    def _analysis(self, request: pb.AnalyzeRequest) -> Analysis:
        inputs = [self._tensor(t, f"inputs[{i}]") for i, t in enumerate(request.inputs)]
        targets = []
        for i, t in enumerate(request.targets):
            if not t.name:
                raise InvalidArgument(
                    f"targets[{i}].name is empty",
                    reason="UNKNOWN_TARGET",
                    field=f"targets[{i}].name",
                )
            if t.capture not in _CAPTURES:
                raise InvalidArgument(
                    f"targets[{i}].capture has unknown value {t.capture}",
                    reason="BAD_CAPTURE",
                    field=f"targets[{i}].capture",
                )
            activation, gradient = _CAPTURES[t.capture]
            targets.append(
                Target(
                    name=t.name,
                    activation=activation,
                    gradient=gradient,
                    reduction=_target_reduction(t, i),
                )
            )
        objective = self._objective(request) if request.HasField("objective") else None
        if request.precision not in _PRECISIONS:
            raise InvalidArgument(
                f"precision has unknown value {request.precision}",
                reason="BAD_PRECISION",
                field="precision",
            )
        return Analysis(
            inputs=inputs,
            targets=targets,
            objective=objective,
            input_gradients=request.input_grads,
            outputs=request.outputs,
            param_grads=list(request.param_grads),
            autocast=_PRECISIONS[request.precision],
        )

    def _objective(self, request: pb.AnalyzeRequest) -> Objective:
        kind = request.objective.WhichOneof("kind")
        if kind is None:
            raise InvalidArgument(
                "objective is set but names no kind", reason="BAD_OBJECTIVE", field="objective"
            )
        body = getattr(request.objective, kind)
        field = f"objective.{kind}"
        tensor = None
        for name in ("labels", "expected", "grad_output"):
            if name in body.DESCRIPTOR.fields_by_name and body.HasField(name):
                tensor = self._tensor(getattr(body, name), f"{field}.{name}")
        reduction = "mean"
        if "reduction" in body.DESCRIPTOR.fields_by_name:
            if body.reduction not in _REDUCTIONS:
                raise InvalidArgument(
                    f"{field}.reduction has unknown value {body.reduction}",
                    reason="BAD_OBJECTIVE",
                    field=f"{field}.reduction",
                )
            reduction = _REDUCTIONS[body.reduction]
        return Objective(
            kind=kind,
            output=body.site.output,
            node=body.site.node,
            index=tuple(body.index) if kind == "logit" else (),
            tensor=tensor,
            reduction=reduction,
            field=field,
        )

    @_status_mapped
    def Attribute(
        self, request: pb.AttributeRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:  # messages, or pre-encoded chunk messages (bytes)
        started = time.perf_counter()
        model = self._model(request.model)
        attribution = method_wire.attribution(request, self._tensor)
        outcome = attribute(
            self.engine.device, model, attribution, should_stop=lambda: not context.is_active()
        )
        yield from method_wire.attribute_responses(outcome, model, self.replica, started)

    @_status_mapped
    def Perturb(
        self, request: pb.PerturbRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:  # messages, or pre-encoded chunk messages (bytes)
        started = time.perf_counter()
        model = self._model(request.model)
        objective = (
            self._objective(pb.AnalyzeRequest(objective=request.objective))
            if request.HasField("objective")
            else None
        )
        perturbation = method_wire.perturbation(request, objective, self._tensor)
        steps = perturb(
            self.engine, model, perturbation, should_stop=lambda: not context.is_active()
        )
        yield from method_wire.perturb_responses(steps, model, self.replica, started)


def _target_reduction(target: pb.TargetLayer, i: int) -> Reduction | None:
    """The engine's Reduction for a target's reduction and transfer dtype; None for neither."""
    field = f"targets[{i}]"
    dtype = None
    if target.dtype != pb.DTYPE_UNSPECIFIED:
        dtype = wire.TORCH_DTYPES.get(target.dtype)
        if dtype is None:
            raise InvalidArgument(
                f"{field}.dtype has unknown value {target.dtype}",
                reason="UNSUPPORTED_TRANSFER_DTYPE",
                field=f"{field}.dtype",
            )
    r = target.reduction
    if r.reduce != pb.REDUCE_UNSPECIFIED and r.reduce not in wire.REDUCES:
        raise InvalidArgument(
            f"{field}.reduction.reduce has unknown value {r.reduce}",
            reason="BAD_REDUCTION",
            field=f"{field}.reduction.reduce",
        )
    reduction = Reduction(
        reduce=wire.REDUCES.get(r.reduce), dims=tuple(r.dims) or None, topk=r.topk, dtype=dtype
    )
    return None if reduction == Reduction() else reduction


def _summary(model: Model) -> pb.ModelSummary:
    return pb.ModelSummary(name=model.name, digest=model.digest, source=model.source)


def _spec(spec: Spec) -> pb.TensorSpec:
    return pb.TensorSpec(
        dtype=wire.WIRE_DTYPES.get(spec.dtype, pb.DTYPE_UNSPECIFIED),
        shape=[d.size if d.size is not None else -1 for d in spec.dims],
        dims=[d.symbol for d in spec.dims],
        min_shape=[d.size if d.size is not None else d.min for d in spec.dims],
        max_shape=[
            d.size if d.size is not None else (d.max if d.max is not None else -1)
            for d in spec.dims
        ],
    )
