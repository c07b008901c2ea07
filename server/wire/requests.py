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
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import torch
from google.protobuf.message import Message

from gradtap.v1 import gradtap_pb2 as pb

from ..engine import budget
from ..engine.adversarial import NORMS as ENGINE_NORMS
from ..engine.adversarial import ZERO_THRESHOLD, Perturbation
from ..engine.aggregate import Aggregator
from ..engine.analysis import Analysis, Target
from ..engine.attribution import Attribution
from ..engine.objectives import IGNORE_INDEX, LossReduction, Objective
from ..engine.reduce import Reduction
from ..errors import InvalidArgument, RequestError
from ..models.model import Model
from ..models.registry import Registry
from ..models.text import Tokenized, text_inputs
from ..models.versions import MODEL_NAME, VERSION, valid_version
from . import names, shm, text
from .tensors import copied, declared


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_tensor_elements: int = 1 << 28
    max_result_bytes: int = 2 << 30
    shared_memory: bool = False
    """Whether callers on this host may have results written into their shared memory."""


_CAPTURES = {
    pb.CAPTURE_UNSPECIFIED: (False, True, False),
    pb.CAPTURE_GRADIENT: (False, True, False),
    pb.CAPTURE_ACTIVATION: (True, False, False),
    pb.CAPTURE_GRADIENT_AND_ACTIVATION: (True, True, False),
    pb.CAPTURE_ATTRIBUTION_PATCHING: (False, False, True),
}
"""Capture -> (activation, gradient, attribution patching)."""

_AUTOCAST = {
    pb.PRECISION_UNSPECIFIED: False,
    pb.PRECISION_FULL: False,
    pb.PRECISION_BFLOAT16_AUTOCAST: True,
}
"""Precision -> whether the forward pass runs under bfloat16 autocast."""


def model(registry: Registry, ref: pb.Model) -> AbstractContextManager[Model]:
    """The served model a request names: the version it names, or the one whose digest it
    pins, or the default. Held (see Registry.use) until the `with` block ends: a version
    replaced or unloaded meanwhile finishes this call."""
    if not ref.name:
        raise InvalidArgument("model.name is required", reason="MISSING_MODEL", field="model.name")
    if not MODEL_NAME.fullmatch(ref.name):
        raise InvalidArgument(
            f"model.name must match {MODEL_NAME.pattern}",
            reason="BAD_MODEL_NAME",
            field="model.name",
        )
    if ref.version and not valid_version(ref.version):
        raise InvalidArgument(
            f"model.version must match {VERSION.pattern} without '..'",
            reason="BAD_MODEL_VERSION",
            field="model.version",
        )
    return registry.use(ref.name, ref.version, ref.digest)


# -- Analyze and AnalyzeMany ------------------------------------------------------------------


@dataclass(frozen=True)
class AnalyzeCall:
    """A decoded Analyze request: the engine's analysis, and where its result goes."""

    analysis: Analysis
    region: shm.RegionRequest | None = None
    """The caller's shared-memory region, checked and big enough; None streams the result."""
    tokenized: Tokenized | None = None
    """For a request sending texts: the tokens the server made of them."""


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
    return AnalyzeCall(checked.decoded(), region, checked.tokenized)


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
    request: pb.AnalyzeManyRequest, served: Model, limits: Limits, aggregate: bool
) -> Analysis:
    """One item of an AnalyzeMany stream, for the model the first item named (the servicer
    holds it for the whole stream, so every item runs on the same version).

    Errors name the field inside the item; `item` adds the item's position.
    """
    ref = request.item.model
    if (
        ref.name != served.name
        or (ref.version and ref.version != served.version)
        or (ref.digest and ref.digest != served.digest)
    ):
        raise InvalidArgument(
            f"every item must name the model of the first, {served.name!r} version "
            f"{served.version!r}",
            reason="MODEL_CHANGED",
            field="model.name",
        )
    checked = _Checked.of(request.item, served, limits)
    if aggregate:
        Aggregator.check(checked.analysis)
    return checked.decoded()


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
    tokenized: Tokenized | None = None
    """For a request sending texts: its rows tokenized (the inputs are then real tensors)."""

    @classmethod
    def of(cls, request: pb.AnalyzeRequest, served: Model, limits: Limits) -> _Checked:
        inputs = [
            declared(t, f"inputs[{i}]", limits.max_tensor_elements)
            for i, t in enumerate(request.inputs)
        ]
        tokenized = text.texts(request, served)
        if tokenized is not None:
            inputs = text_inputs(served, tokenized, "texts")
        targets = [_target(t, i) for i, t in enumerate(request.targets)]
        corrupt = _corrupt_inputs(request, inputs, targets, limits)
        objective = (
            objective_of(request.objective, limits, served)
            if request.HasField("objective")
            else None
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
            corrupt_inputs=corrupt,
        )
        served.check_inputs(inputs)
        sizes = budget.check(served, analysis, limits.max_result_bytes)
        return cls(request, analysis, sizes, tokenized)

    def decoded(self) -> Analysis:
        """The analysis with every tensor's bytes copied out of the request."""
        objective = self.analysis.objective
        if objective is not None:
            objective = objective_copied(self.request.objective, objective)
        inputs = list(self.analysis.inputs)  # texts: tokenized, already real
        if self.tokenized is None:
            inputs = [copied(m, t) for m, t in zip(self.request.inputs, inputs)]
        corrupt = [
            copied(m, t) for m, t in zip(self.request.corrupt_inputs, self.analysis.corrupt_inputs)
        ]
        return replace(self.analysis, inputs=inputs, objective=objective, corrupt_inputs=corrupt)


def _corrupt_inputs(
    request: pb.AnalyzeRequest,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[Target],
    limits: Limits,
) -> list[torch.Tensor]:
    """Attribution patching's corrupted inputs, declared: one per input, of its dtype and
    shape; there only with a target captured as ATTRIBUTION_PATCHING, and required by one."""
    corrupt = [
        declared(t, f"corrupt_inputs[{i}]", limits.max_tensor_elements)
        for i, t in enumerate(request.corrupt_inputs)
    ]
    patching = any(t.patching for t in targets)
    if patching and not corrupt:
        raise InvalidArgument(
            "attribution patching needs corrupt_inputs: the corrupted inputs, shaped like inputs",
            reason="CORRUPT_INPUTS_REQUIRED",
            field="corrupt_inputs",
        )
    if corrupt and not patching:
        raise InvalidArgument(
            "corrupt_inputs are for attribution patching: capture at least one target as "
            "ATTRIBUTION_PATCHING",
            reason="PATCHING_TARGET_REQUIRED",
            field="targets",
        )
    if corrupt and len(corrupt) != len(inputs):
        raise InvalidArgument(
            f"corrupt_inputs has {len(corrupt)} tensor(s); inputs has {len(inputs)}",
            reason="WRONG_INPUT_COUNT",
            field="corrupt_inputs",
        )
    for i, (bad, good) in enumerate(zip(corrupt, inputs)):
        if bad.dtype != good.dtype or bad.shape != good.shape:
            raise InvalidArgument(
                f"corrupt_inputs[{i}] has dtype {str(bad.dtype).removeprefix('torch.')} and "
                f"shape {list(bad.shape)}; inputs[{i}] has "
                f"{str(good.dtype).removeprefix('torch.')} and {list(good.shape)}: clean and "
                "corrupted inputs must match",
                reason="WRONG_SHAPE" if bad.dtype == good.dtype else "WRONG_DTYPE",
                field=f"corrupt_inputs[{i}]",
            )
    return corrupt


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
    activation, gradient, patching = _CAPTURES[target.capture]
    return Target(
        name=target.name,
        activation=activation,
        gradient=gradient,
        reduction=_reduction(target, i),
        patching=patching,
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


_OBJECTIVE_TENSORS = ("labels", "expected", "grad_output", "tokens")
"""The tensor fields of the objective kinds; each kind has one at most (log_prob also has
positions)."""


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


def objective_of(message: pb.Objective, limits: Limits, served: Model) -> Objective:
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
    positions = None
    if _has(body, "positions"):
        positions = declared(body.positions, f"{field}.positions", limits.max_tensor_elements)
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
    index: tuple[int, ...] = ()
    if kind == "logit":
        index = tuple(body.index)
    elif kind == "logit_diff":
        index = tuple(body.correct)
    return Objective(
        kind=kind,
        output=_output(body.site.output, body.site.output_name, served, f"{field}.site."),
        node=body.site.node,
        index=index,
        tensor=tensor,
        reduction=reduction,
        field=field,
        position=body.position if _has(body, "position") else None,
        wrong=tuple(body.wrong) if kind == "logit_diff" else (),
        probabilities=kind == "logit_diff" and body.probabilities,
        positions=positions,
        class_dim=body.class_dim if _has(body, "class_dim") else None,
        ignore_index=body.ignore_index if _has(body, "ignore_index") else IGNORE_INDEX,
        shift=kind == "cross_entropy" and body.shift,
    )


def objective_copied(message: pb.Objective, objective: Objective) -> Objective:
    """The objective with its tensors' bytes copied out of `message` (see `objective_of`)."""
    body = getattr(message, message.WhichOneof("kind") or "")
    if objective.positions is not None:
        objective = replace(objective, positions=copied(body.positions, objective.positions))
    if objective.tensor is None:
        return objective
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
        objective_of(request.objective, limits, served) if request.HasField("objective") else None
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
        objective=objective_copied(request.objective, objective),
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
