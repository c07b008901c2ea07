"""Requests off the wire: each RPC's message to the engine's objects, checked in full first.

Every check of a request happens here, before anything of its size is allocated: each
tensor's header, each enum, the model's input specs (`Model.check_inputs`) and the size of
the result. Only then are the tensors' bytes copied. The engine trusts what comes out of
here and checks what only it can (that targets resolve, that an objective fits its site).
Errors name the request field at fault, e.g. `targets[2].name`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from google.protobuf.message import Message

from gradtap.v1 import gradtap_pb2 as pb

from ..engine import budget
from ..engine.adversarial import NORMS as ENGINE_NORMS
from ..engine.adversarial import ZERO_THRESHOLD, Perturbation
from ..engine.aggregate import Aggregator
from ..engine.analysis import Analysis, Target
from ..engine.attribution import Attribution
from ..engine.objectives import LossReduction, Objective
from ..engine.reduce import Reduction
from ..errors import FailedPrecondition, InvalidArgument, NotFound, RequestError
from ..models.model import Model
from ..models.registry import MODEL_NAME, Registry
from . import names, shm
from .tensors import copied, declared


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
"""Capture -> (activation, gradient)."""

_AUTOCAST = {
    pb.PRECISION_UNSPECIFIED: False,
    pb.PRECISION_FULL: False,
    pb.PRECISION_BFLOAT16_AUTOCAST: True,
}
"""Precision -> whether the forward pass runs under bfloat16 autocast."""


def model(registry: Registry, ref: pb.Model) -> Model:
    """The served model a request names, at the digest it pins (if it pins one)."""
    if not ref.name:
        raise InvalidArgument("model.name is required", reason="MISSING_MODEL", field="model.name")
    if not MODEL_NAME.fullmatch(ref.name):
        raise InvalidArgument(
            f"model.name must match {MODEL_NAME.pattern}",
            reason="BAD_MODEL_NAME",
            field="model.name",
        )
    found = registry.get(ref.name)
    if found is None:
        raise NotFound(f"no model named {ref.name!r}", reason="MODEL_NOT_FOUND", field="model.name")
    if ref.digest and ref.digest != found.digest:
        raise FailedPrecondition(
            f"model {ref.name!r} has digest {found.digest}, not the pinned {ref.digest[:80]}",
            reason="DIGEST_MISMATCH",
            field="model.digest",
        )
    return found


# -- Analyze and AnalyzeMany ------------------------------------------------------------------


@dataclass(frozen=True)
class AnalyzeCall:
    """A decoded Analyze request: the engine's analysis, and where its result goes."""

    analysis: Analysis
    region: shm.RegionRequest | None = None
    """The caller's shared-memory region, checked and big enough; None streams the result."""


def analyze(
    request: pb.AnalyzeRequest,
    served: Model,
    limits: Limits,
    peer: Callable[[], str] | None = None,
) -> AnalyzeCall:
    """Checks and decodes an Analyze request for `served`.

    `peer` says where the caller is (a gRPC peer string); it is asked only when the request
    names a shared-memory region. Without it the region is ignored, as for AnalyzeMany items.
    """
    checked = _Checked.of(request, served, limits)
    region = None
    if peer is not None and request.HasField("shared_memory"):
        region = _region(request.shared_memory, checked.sizes, limits, peer())
    return AnalyzeCall(checked.decoded(), region)


def many_options(first: pb.AnalyzeManyRequest) -> pb.AnalyzeManyOptions:
    """The stream's options, from its first message."""
    options = first.options
    if options.omit_items and not options.aggregate:
        raise InvalidArgument(
            "omit_items sends nothing back without aggregate",
            reason="BAD_OPTIONS",
            field="options.omit_items",
        )
    return options


def many_item(
    request: pb.AnalyzeManyRequest,
    registry: Registry,
    first: Model | None,
    limits: Limits,
    aggregate: bool,
) -> tuple[Model, Analysis]:
    """One item of an AnalyzeMany stream: its model (that of the first item) and analysis.

    Errors name the field inside the item; `item` adds the item's position.
    """
    served = model(registry, request.item.model)
    if first is not None and served is not first:
        raise InvalidArgument(
            f"every item must name the model of the first, {first.name!r}",
            reason="MODEL_CHANGED",
            field="model.name",
        )
    checked = _Checked.of(request.item, served, limits)
    if aggregate:
        Aggregator.check(checked.analysis)
    return served, checked.decoded()


@contextlib.contextmanager
def item(index: int) -> Iterator[None]:
    """Names the item in any RequestError raised inside: field items[K].<field>."""
    try:
        yield
    except RequestError as e:
        field = f"items[{index}].{e.field}" if e.field else f"items[{index}]"
        raise type(e)(f"item {index}: {e.message}", reason=e.reason, field=field) from e


@dataclass(frozen=True)
class _Checked:
    """An Analyze request that passed every check, its tensors not yet copied."""

    request: pb.AnalyzeRequest
    analysis: Analysis
    """The analysis with its tensors on the meta device: dtypes and shapes, no bytes."""
    sizes: list[int]
    """The estimated bytes of each tensor of the result."""

    @classmethod
    def of(cls, request: pb.AnalyzeRequest, served: Model, limits: Limits) -> _Checked:
        inputs = [
            declared(t, f"inputs[{i}]", limits.max_tensor_elements)
            for i, t in enumerate(request.inputs)
        ]
        targets = [_target(t, i) for i, t in enumerate(request.targets)]
        objective = (
            _objective(request.objective, limits, served) if request.HasField("objective") else None
        )
        if request.precision not in _AUTOCAST:
            raise InvalidArgument(
                f"precision has unknown value {request.precision}",
                reason="BAD_PRECISION",
                field="precision",
            )
        analysis = Analysis(
            inputs=inputs,
            targets=targets,
            objective=objective,
            input_gradients=request.input_grads,
            outputs=request.outputs,
            param_grads=list(request.param_grads),
            autocast=_AUTOCAST[request.precision],
        )
        served.check_inputs(inputs)
        sizes = budget.check(served, analysis, limits.max_result_bytes)
        return cls(request, analysis, sizes)

    def decoded(self) -> Analysis:
        """The analysis with every tensor's bytes copied out of the request."""
        objective = self.analysis.objective
        if objective is not None:
            objective = _copied(self.request.objective, objective)
        inputs = [copied(m, t) for m, t in zip(self.request.inputs, self.analysis.inputs)]
        return replace(self.analysis, inputs=inputs, objective=objective)


def _target(target: pb.TargetLayer, i: int) -> Target:
    if not target.name:
        raise InvalidArgument(
            f"targets[{i}].name is empty", reason="UNKNOWN_TARGET", field=f"targets[{i}].name"
        )
    if target.capture not in _CAPTURES:
        raise InvalidArgument(
            f"targets[{i}].capture has unknown value {target.capture}",
            reason="BAD_CAPTURE",
            field=f"targets[{i}].capture",
        )
    activation, gradient = _CAPTURES[target.capture]
    return Target(
        name=target.name,
        activation=activation,
        gradient=gradient,
        reduction=_reduction(target, i),
    )


def _reduction(target: pb.TargetLayer, i: int) -> Reduction | None:
    """The engine's Reduction for a target's reduction and transfer dtype; None for neither."""
    field = f"targets[{i}]"
    dtype = None
    if target.dtype != pb.DTYPE_UNSPECIFIED:
        dtype = names.TORCH_DTYPES.get(target.dtype)
        if dtype is None:
            raise InvalidArgument(
                f"{field}.dtype has unknown value {target.dtype}",
                reason="UNSUPPORTED_TRANSFER_DTYPE",
                field=f"{field}.dtype",
            )
    r = target.reduction
    reduce = None
    if r.reduce != pb.REDUCE_UNSPECIFIED:
        reduce = names.REDUCES.get(r.reduce)
        if reduce is None:
            raise InvalidArgument(
                f"{field}.reduction.reduce has unknown value {r.reduce}",
                reason="BAD_REDUCTION",
                field=f"{field}.reduction.reduce",
            )
    reduction = Reduction(reduce=reduce, dims=tuple(r.dims) or None, topk=r.topk, dtype=dtype)
    return None if reduction == Reduction() else reduction


_OBJECTIVE_TENSORS = ("labels", "expected", "grad_output")
"""The tensor fields of the objective kinds; each kind has one at most."""


def _has(body: Message, name: str) -> bool:
    return name in body.DESCRIPTOR.fields_by_name and body.HasField(name)


def _output(output: int, output_name: str, served: Model, field: str) -> int:
    """The output position a request picks: `output`, or the output named `output_name`."""
    if not output_name:
        return output
    if output:
        raise InvalidArgument(
            f"{field} sets both output ({output}) and output_name ({output_name[:80]!r}): "
            "name the output one way",
            reason="BAD_OUTPUT",
            field=f"{field}output_name",
        )
    return served.output_position(output_name, f"{field}output_name")


def _objective(message: pb.Objective, limits: Limits, served: Model) -> Objective:
    """The objective, its tensor (if its kind has one) declared on the meta device."""
    kind = message.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(
            "objective is set but names no kind", reason="BAD_OBJECTIVE", field="objective"
        )
    body = getattr(message, kind)
    field = f"objective.{kind}"
    tensor = None
    for name in _OBJECTIVE_TENSORS:
        if _has(body, name):
            tensor = declared(getattr(body, name), f"{field}.{name}", limits.max_tensor_elements)
    reduction = LossReduction.MEAN
    if "reduction" in body.DESCRIPTOR.fields_by_name and body.reduction:
        found = names.LOSS_REDUCTIONS.get(body.reduction)
        if found is None:
            raise InvalidArgument(
                f"{field}.reduction has unknown value {body.reduction}",
                reason="BAD_OBJECTIVE",
                field=f"{field}.reduction",
            )
        reduction = found
    return Objective(
        kind=kind,
        output=_output(body.site.output, body.site.output_name, served, f"{field}.site."),
        node=body.site.node,
        index=tuple(body.index) if kind == "logit" else (),
        tensor=tensor,
        reduction=reduction,
        field=field,
    )


def _copied(message: pb.Objective, objective: Objective) -> Objective:
    """The objective with its tensor's bytes copied out of `message` (see `_objective`)."""
    if objective.tensor is None:
        return objective
    body = getattr(message, message.WhichOneof("kind") or "")
    source = next(getattr(body, name) for name in _OBJECTIVE_TENSORS if _has(body, name))
    return replace(objective, tensor=copied(source, objective.tensor))


def _region(
    message: pb.SharedMemoryRegion, sizes: Sequence[int], limits: Limits, peer: str
) -> shm.RegionRequest:
    """The caller's shared-memory region, checked before any work; `sizes` are the result's
    estimated tensor bytes."""
    ask = shm.RegionRequest(name=message.name, size=message.size, token=message.token)
    shm.check_request(ask, enabled=limits.shared_memory, local=shm.is_local(peer))
    _, needed = shm.layout(sizes)
    if needed > ask.size:
        raise shm.too_small(ask, needed)
    return ask


# -- Attribute and Perturb --------------------------------------------------------------------


def _enum_error(what: str, value: int, field: str) -> InvalidArgument:
    reason = "UNKNOWN_METHOD" if field == "method" else "BAD_PARAMETER"
    message = f"{field} is required" if value == 0 else f"{field} has unknown value {value}"
    return InvalidArgument(f"{message}: the {what}", reason=reason, field=field)


def attribution(request: pb.AttributeRequest, served: Model, limits: Limits) -> Attribution:
    """Checks and decodes an Attribute request; params keep only the fields set."""
    method = names.ATTRIBUTION_METHODS.get(request.method)
    if method is None:
        raise _enum_error("attribution method", request.method, "method")
    inputs = [
        declared(t, f"inputs[{i}]", limits.max_tensor_elements)
        for i, t in enumerate(request.inputs)
    ]
    p = request.params
    # Every scalar parameter is `optional`: ListFields names exactly the ones set.
    params: dict[str, object] = {
        fd.name: value for fd, value in p.ListFields() if fd.name not in ("method", "baselines")
    }
    if p.method != pb.INTEGRATION_METHOD_UNSPECIFIED:
        integration = names.INTEGRATION_METHODS.get(p.method)
        if integration is None:
            raise _enum_error("integration method", p.method, "params.method")
        params["method"] = integration
    baselines = None
    if p.HasField("baselines"):
        baselines = declared(p.baselines, "params.baselines", limits.max_tensor_elements)
    served.check_inputs(inputs)
    if baselines is not None:
        params["baselines"] = copied(p.baselines, baselines)
    return Attribution(
        inputs=[copied(m, t) for m, t in zip(request.inputs, inputs)],
        method=method,
        target=tuple(request.index),
        output=_output(request.output, request.output_name, served, ""),
        layer=request.node,
        params=params,
    )


def perturbation(request: pb.PerturbRequest, served: Model, limits: Limits) -> Perturbation:
    """Checks and decodes a Perturb request."""
    objective = (
        _objective(request.objective, limits, served) if request.HasField("objective") else None
    )
    method = names.PERTURB_METHODS.get(request.method)
    if method is None:
        raise _enum_error("perturbation method (fgsm or pgd)", request.method, "method")
    norm = ENGINE_NORMS[0]
    if request.norm != pb.PERTURB_NORM_UNSPECIFIED:
        found = names.NORMS.get(request.norm)
        if found is None:
            raise _enum_error("norm", request.norm, "norm")
        norm = found
    inputs = [
        declared(t, f"inputs[{i}]", limits.max_tensor_elements)
        for i, t in enumerate(request.inputs)
    ]
    mask = (
        declared(request.mask, "mask", limits.max_tensor_elements)
        if request.HasField("mask")
        else None
    )
    if objective is None:
        raise InvalidArgument(
            "perturb needs an objective: the loss the steps ascend (or, targeted, descend)",
            reason="OBJECTIVE_REQUIRED",
            field="objective",
        )
    served.check_inputs(inputs)
    return Perturbation(
        inputs=[copied(m, t) for m, t in zip(request.inputs, inputs)],
        objective=_copied(request.objective, objective),
        method=method,
        epsilon=request.epsilon,
        step_size=request.step_size,
        steps=request.steps,
        norm=norm,
        targeted=request.targeted,
        lower_bound=request.lower_bound if request.HasField("lower_bound") else -math.inf,
        upper_bound=request.upper_bound if request.HasField("upper_bound") else math.inf,
        random_start=request.random_start,
        seed=request.seed if request.HasField("seed") else None,
        mask=copied(request.mask, mask) if mask is not None else None,
        zero_threshold=(
            request.zero_threshold if request.HasField("zero_threshold") else ZERO_THRESHOLD
        ),
    )
