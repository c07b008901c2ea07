"""Thin gRPC adapter: protobuf in, engine call, chunks out; errors mapped to status in one place."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf import any_pb2, message_factory
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

from . import wire
from .engine import Analysis, Engine, Objective, Target
from .errors import FailedPrecondition, InvalidArgument, Kind, NotFound, RequestError
from .models import MODEL_NAME, Model, Registry, Spec

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
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))
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


def _status_mapped(method: F) -> F:
    """Turns RequestError into its status and any other exception into a generic INTERNAL."""

    def abort(context: grpc.ServicerContext, error: Exception) -> None:
        if isinstance(error, RequestError):
            context.abort_with_status(status_for(error))
        log.exception("bug while serving %s", method.__name__)
        context.abort_with_status(status_for(_INTERNAL))

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as e:  # noqa: BLE001 - mapped to a status right here
                abort(context, e)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as e:  # noqa: BLE001 - mapped to a status right here
            abort(context, e)

    return unary  # type: ignore[return-value]


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_tensor_elements: int = 1 << 28


_CAPTURES = {
    pb.CAPTURE_UNSPECIFIED: (False, True),
    pb.CAPTURE_GRADIENT: (False, True),
    pb.CAPTURE_ACTIVATION: (True, False),
    pb.CAPTURE_GRADIENT_AND_ACTIVATION: (True, True),
}
_REDUCTIONS = {
    pb.LOSS_REDUCTION_UNSPECIFIED: "mean",
    pb.LOSS_REDUCTION_MEAN: "mean",
    pb.LOSS_REDUCTION_SUM: "sum",
}


def add_to_server(servicer: pb_grpc.GradientServiceServicer, server: grpc.Server) -> None:
    """Registers every RPC of GradientService, built from the service descriptor.

    Unlike the generated add_GradientServiceServicer_to_server, responses may also be
    pre-encoded bytes (see wire.encode_chunk), which spares a copy of every tensor chunk.
    """
    service = pb.DESCRIPTOR.services_by_name["GradientService"]
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in service.methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        factory = factories[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=request_type.FromString,
            response_serializer=wire.serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def replica_id() -> str:
    """This process, as "<host>:<pid>"."""
    return f"{socket.gethostname()}:{os.getpid()}"


class GradientServicer(pb_grpc.GradientServiceServicer):
    """Implements gradtap.v1.GradientService over a registry of models and an engine."""

    def __init__(self, registry: Registry, engine: Engine, limits: Limits | None = None) -> None:
        self.registry = registry
        self.engine = engine
        self.limits = limits or Limits()
        self.replica = replica_id()

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
        decode_ms = (time.perf_counter() - started) * 1e3
        outcome = self.engine.analyze(model, analysis, should_stop=lambda: not context.is_active())
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
        )
        first = pb.AnalyzeResponse(header=wire.header(outcome.tensors))
        yield from wire.frames(outcome.tensors, first, summary)

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
            targets.append(Target(name=t.name, activation=activation, gradient=gradient))
        objective = self._objective(request) if request.HasField("objective") else None
        return Analysis(
            inputs=inputs,
            targets=targets,
            objective=objective,
            input_gradients=request.input_gradients,
            outputs=request.outputs,
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
        for name in ("labels", "target", "grad_output"):
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
