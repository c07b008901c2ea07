"""Requests off the wire: Attribute and Perturb decoded, and their streams framed; AnalyzeMany's
item-tagged errors.

The streams are framed as Analyze's are (header, chunks of at most 1 MiB, summary), with
TensorHeader roles ATTRIBUTION and ADVERSARIAL; Perturb sends one progress message per
step before its result.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch

from gradtap.v1 import gradtap_pb2 as pb

from ..engine.adversarial import ZERO_THRESHOLD, Perturbation, Perturbed, Step
from ..engine.analysis import Collected, Objective, Role
from ..engine.attribution import CAPTUM_VERSION, Attributed, Attribution
from ..errors import InvalidArgument, RequestError
from ..models.model import Model
from . import frames

TensorDecoder = Callable[[pb.Tensor, str], torch.Tensor]
"""Decodes a request tensor, naming its field in errors (GradientServicer._tensor)."""

ATTRIBUTION_METHODS: dict[pb.AttributionMethod.ValueType, str] = {
    pb.ATTRIBUTION_METHOD_SALIENCY: "saliency",
    pb.ATTRIBUTION_METHOD_INPUT_X_GRADIENT: "input_x_gradient",
    pb.ATTRIBUTION_METHOD_INTEGRATED_GRADIENTS: "integrated_gradients",
    pb.ATTRIBUTION_METHOD_SMOOTHGRAD: "smoothgrad",
    pb.ATTRIBUTION_METHOD_GUIDED_BACKPROP: "guided_backprop",
    pb.ATTRIBUTION_METHOD_LAYER_GRADIENT_X_ACTIVATION: "layer_gradient_x_activation",
    pb.ATTRIBUTION_METHOD_LAYER_GRAD_CAM: "layer_grad_cam",
    pb.ATTRIBUTION_METHOD_LAYER_INTEGRATED_GRADIENTS: "layer_integrated_gradients",
    pb.ATTRIBUTION_METHOD_LAYER_CONDUCTANCE: "layer_conductance",
}
INTEGRATION_METHODS: dict[pb.IntegrationMethod.ValueType, str] = {
    pb.INTEGRATION_METHOD_GAUSSLEGENDRE: "gausslegendre",
    pb.INTEGRATION_METHOD_RIEMANN_LEFT: "riemann_left",
    pb.INTEGRATION_METHOD_RIEMANN_RIGHT: "riemann_right",
    pb.INTEGRATION_METHOD_RIEMANN_MIDDLE: "riemann_middle",
    pb.INTEGRATION_METHOD_RIEMANN_TRAPEZOID: "riemann_trapezoid",
}
PERTURB_METHODS: dict[pb.PerturbMethod.ValueType, str] = {
    pb.PERTURB_METHOD_FGSM: "fgsm",
    pb.PERTURB_METHOD_PGD: "pgd",
}
NORMS: dict[pb.PerturbNorm.ValueType, str] = {
    pb.PERTURB_NORM_UNSPECIFIED: "Linf",
    pb.PERTURB_NORM_LINF: "Linf",
    pb.PERTURB_NORM_L2: "L2",
}


def _enum_error(what: str, value: int, field: str) -> InvalidArgument:
    reason = "UNKNOWN_METHOD" if field == "method" else "BAD_PARAMETER"
    message = f"{field} is required" if value == 0 else f"{field} has unknown value {value}"
    return InvalidArgument(f"{message}: the {what}", reason=reason, field=field)


def attribution(request: pb.AttributeRequest, tensor: TensorDecoder) -> Attribution:
    """An engine-side Attribution from the request; params keep only the fields set."""
    method = ATTRIBUTION_METHODS.get(request.method)
    if method is None:
        raise _enum_error("attribution method", request.method, "method")
    inputs = [tensor(t, f"inputs[{i}]") for i, t in enumerate(request.inputs)]
    p = request.params
    # Every scalar parameter is `optional`: ListFields names exactly the ones set.
    params: dict[str, object] = {
        fd.name: value for fd, value in p.ListFields() if fd.name not in ("method", "baselines")
    }
    if p.method != pb.INTEGRATION_METHOD_UNSPECIFIED:
        if p.method not in INTEGRATION_METHODS:
            raise _enum_error("integration method", p.method, "params.method")
        params["method"] = INTEGRATION_METHODS[p.method]
    if p.HasField("baselines"):
        params["baselines"] = tensor(p.baselines, "params.baselines")
    return Attribution(
        inputs=inputs,
        method=method,
        target=tuple(request.index),
        output=request.output,
        layer=request.node,
        params=params,
    )


def perturbation(
    request: pb.PerturbRequest, objective: Objective | None, tensor: TensorDecoder
) -> Perturbation:
    """An engine-side Perturbation from the request and its decoded objective."""
    method = PERTURB_METHODS.get(request.method)
    if method is None:
        raise _enum_error("perturbation method (fgsm or pgd)", request.method, "method")
    norm = NORMS.get(request.norm)
    if norm is None:
        raise _enum_error("norm", request.norm, "norm")
    return Perturbation(
        inputs=[tensor(t, f"inputs[{i}]") for i, t in enumerate(request.inputs)],
        objective=objective,
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
        mask=tensor(request.mask, "mask") if request.HasField("mask") else None,
        zero_threshold=(
            request.zero_threshold if request.HasField("zero_threshold") else ZERO_THRESHOLD
        ),
    )


# -- framing ----------------------------------------------------------------------------------


def _single(role: Role, index: int, tensor: torch.Tensor) -> list[Collected]:
    return [Collected(role, "", index, tensor)]


def attribute_responses(
    outcome: Attributed, model: Model, replica: str, started: float
) -> Iterator[pb.AttributeResponse | bytes]:
    """The Attribute stream for a finished attribution."""

    summary = pb.AttributeSummary(
        model_digest=model.digest,
        device=outcome.device,
        torch_version=torch.__version__,
        captum_version=CAPTUM_VERSION,
        replica=replica,
        tensor_count=1,
        seed=outcome.seed,
        internal_batch_size=outcome.internal_batch_size,
        compute_ms=outcome.compute_ms,
        total_ms=(time.perf_counter() - started) * 1e3,
    )

    tensors = _single(Role.ATTRIBUTION, outcome.index, outcome.tensor)
    first = pb.AttributeResponse(header=frames.header(tensors))
    yield from frames.frames(tensors, first, summary)


def perturb_responses(
    events: Iterator[Step | Perturbed], model: Model, replica: str, started: float
) -> Iterator[pb.PerturbResponse | bytes]:
    """The Perturb stream: a progress message per step as the loop runs, then the result."""
    for event in events:
        if isinstance(event, Step):
            yield pb.PerturbResponse(progress=pb.PerturbProgress(step=event.step, loss=event.loss))
        else:
            yield from _perturb_result(event, model, replica, started)


def _perturb_result(
    result: Perturbed, model: Model, replica: str, started: float
) -> Iterator[pb.PerturbResponse | bytes]:
    summary = pb.PerturbSummary(
        objective_before=result.objective_before,
        objective_after=result.objective_after,
        losses=result.losses,
        model_digest=model.digest,
        device=result.device,
        torch_version=torch.__version__,
        replica=replica,
        tensor_count=1,
        seed=result.seed,
        total_ms=(time.perf_counter() - started) * 1e3,
    )

    tensors = _single(Role.ADVERSARIAL, result.index, result.adversarial)
    first = pb.PerturbResponse(header=frames.header(tensors))
    yield from frames.frames(tensors, first, summary)


@contextlib.contextmanager
def item(index: int) -> Iterator[None]:
    """Names the item in any RequestError raised inside: field items[K].<field>."""
    try:
        yield
    except RequestError as e:
        field = f"items[{index}].{e.field}" if e.field else f"items[{index}]"
        raise type(e)(f"item {index}: {e.message}", reason=e.reason, field=field) from e
