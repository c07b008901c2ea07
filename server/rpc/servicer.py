"""The servicer: protobuf in, engine call, chunks out; errors leave through rpc/status.py."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from gradtap.v1 import gradtap_pb2 as pb
from gradtap.v1 import gradtap_pb2_grpc as pb_grpc

from ..engine import budget
from ..engine.adversarial import perturb
from ..engine.aggregate import Aggregator
from ..engine.analysis import Analysis, Engine, Objective, Target
from ..engine.attribution import attribute
from ..engine.batching import Batcher
from ..engine.reduce import Reduction
from ..errors import FailedPrecondition, InvalidArgument, NotFound
from ..models.model import Model, Spec
from ..models.registry import MODEL_NAME, Registry
from ..wire import frames, requests, shm, tensors
from . import deadline
from .release import Releaser
from .status import status_mapped


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
        self._releaser = Releaser()

    def close(self) -> None:
        """Releases what finished calls left behind; call it once the server has stopped."""
        self._releaser.close()

    @status_mapped
    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[_summary(m) for m in self.registry])

    @status_mapped
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

    @status_mapped
    def Analyze(
        self, request: pb.AnalyzeRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:  # messages, or pre-encoded chunk messages (bytes)
        started = time.perf_counter()
        model = self._model(request.model)
        analysis = self._analysis(request)
        model.check_inputs(analysis.inputs)
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
            header = frames.header(outcome.tensors)
            if region is not None:
                offsets = region.write(list(frames.on_host([c.tensor for c in outcome.tensors])))
                header.shared_memory = True
                for tensor, offset in zip(header.tensors, offsets):
                    tensor.region_offset = offset
                yield pb.AnalyzeResponse(header=header, summary=summary)
                return
        yield from frames.frames(outcome.tensors, pb.AnalyzeResponse(header=header), summary)

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

    @status_mapped
    def AnalyzeMany(
        self, items: Iterator[pb.AnalyzeManyRequest], context: grpc.ServicerContext
    ) -> Iterator[Any]:  # messages, or pre-encoded chunk messages (bytes)
        stream_started = time.perf_counter()
        options = pb.AnalyzeManyOptions()
        aggregator: Aggregator | None = None
        model: Model | None = None
        device, precision = str(self.engine.device), ""
        for k, request in enumerate(items):
            started = time.perf_counter()
            if k == 0:
                options = request.options
                if options.omit_items and not options.aggregate:
                    raise InvalidArgument(
                        "omit_items sends nothing back without aggregate",
                        reason="BAD_OPTIONS",
                        field="options.omit_items",
                    )
                aggregator = Aggregator() if options.aggregate else None
            with requests.item(k):
                item_model = self._model(request.item.model)
                if model is not None and item_model is not model:
                    raise InvalidArgument(
                        f"every item must name the model of the first, {model.name!r}",
                        reason="MODEL_CHANGED",
                        field="model.name",
                    )
                model = item_model
                analysis = self._analysis(request.item)
                model.check_inputs(analysis.inputs)
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
            first = pb.AnalyzeManyResponse(index=k, header=frames.header(tensors))
            yield from frames.indexed(frames.frames(tensors, first, summary), k)
        if aggregator is not None and model is not None:
            tensors = aggregator.collected()
            total_ms = (time.perf_counter() - stream_started) * 1e3
            summary = self._many_summary(
                model, device, aggregator.loss, {"total_ms": total_ms}, len(tensors)
            )
            summary.precision = precision
            first = pb.AnalyzeManyResponse(
                index=aggregator.items,
                header=frames.header(tensors),
                aggregate=pb.AggregateInfo(items=aggregator.items, rows=aggregator.rows),
            )
            yield from frames.indexed(frames.frames(tensors, first, summary), aggregator.items)

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
        return tensors.decode(message, field, self.limits.max_tensor_elements)

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

    @status_mapped
    def Attribute(
        self, request: pb.AttributeRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:  # messages, or pre-encoded chunk messages (bytes)
        started = time.perf_counter()
        model = self._model(request.model)
        attribution = requests.attribution(request, self._tensor)
        outcome = attribute(
            self.engine.device, model, attribution, should_stop=lambda: not context.is_active()
        )
        yield from requests.attribute_responses(outcome, model, self.replica, started)

    @status_mapped
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
        perturbation = requests.perturbation(request, objective, self._tensor)
        steps = perturb(
            self.engine, model, perturbation, should_stop=lambda: not context.is_active()
        )
        yield from requests.perturb_responses(steps, model, self.replica, started)


def _target_reduction(target: pb.TargetLayer, i: int) -> Reduction | None:
    """The engine's Reduction for a target's reduction and transfer dtype; None for neither."""
    field = f"targets[{i}]"
    dtype = None
    if target.dtype != pb.DTYPE_UNSPECIFIED:
        dtype = tensors.TORCH_DTYPES.get(target.dtype)
        if dtype is None:
            raise InvalidArgument(
                f"{field}.dtype has unknown value {target.dtype}",
                reason="UNSUPPORTED_TRANSFER_DTYPE",
                field=f"{field}.dtype",
            )
    r = target.reduction
    if r.reduce != pb.REDUCE_UNSPECIFIED and r.reduce not in tensors.REDUCES:
        raise InvalidArgument(
            f"{field}.reduction.reduce has unknown value {r.reduce}",
            reason="BAD_REDUCTION",
            field=f"{field}.reduction.reduce",
        )
    reduction = Reduction(
        reduce=tensors.REDUCES.get(r.reduce), dims=tuple(r.dims) or None, topk=r.topk, dtype=dtype
    )
    return None if reduction == Reduction() else reduction


def _summary(model: Model) -> pb.ModelSummary:
    return pb.ModelSummary(name=model.name, digest=model.digest, source=model.source)


def _spec(spec: Spec) -> pb.TensorSpec:
    return pb.TensorSpec(
        dtype=tensors.WIRE_DTYPES.get(spec.dtype, pb.DTYPE_UNSPECIFIED),
        shape=[d.size if d.size is not None else -1 for d in spec.dims],
        dims=[d.symbol for d in spec.dims],
        min_shape=[d.size if d.size is not None else d.min for d in spec.dims],
        max_shape=[
            d.size if d.size is not None else (d.max if d.max is not None else -1)
            for d in spec.dims
        ],
    )
