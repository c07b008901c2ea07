"""The calls, each written once: its signature, its documentation and what it sends.

Each function here takes a public call's arguments and returns a description of the call
(_exchange.Call or ManyCall) without sending anything; argument errors are raised here,
before anything is sent. gradtap.client.Client and gradtap.client.aio.Client make their
methods from these functions, so both take exactly these arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from grpc_health.v1 import health_pb2

from gradtap.v1 import gradtap_pb2 as pb

from . import _legacy as legacy
from ._assemble import (
    AnalysisAssembler,
    AttributionAssembler,
    ManyAssembler,
    PerturbAssembler,
    Reply,
    decode_many_response,
    decode_response,
    description,
    model_infos,
    serving_status,
)
from ._exchange import Call, ManyCall, Method, OnStep
from ._objective import Objective, output_fields
from ._request import (
    ATTRIBUTION_METHODS,
    NORMS,
    PERTURB_METHODS,
    analyze_request,
    arrays,
    attribution_params,
    checked_version,
    choice,
    class_index,
    float_like,
    many_options,
    many_requests,
    model_ref,
    objective_or_none,
    text_rows,
)
from ._result import AttributionResult, ModelDescription, ModelInfo, PerturbResult, Result
from ._shm import SharedRegion
from ._target import Targets, as_targets
from ._tensor import encode

Inputs = Any
"""One array (anything np.asarray takes), or a list of arrays for a model with several."""

ObjectiveFor = Objective | Callable[[int], Objective | None] | None
"""One objective for every item, or a function of the item's position returning its own."""


def _rpc(path: str, kind: Any, request: Any, decode: Callable[[bytes], Any]) -> Method:
    return Method(path, kind, request.SerializeToString, decode)


_SERVICE = "/gradtap.v1.GradientService/"
LIST_MODELS = _rpc(
    _SERVICE + "ListModels", "unary_unary", pb.ListModelsRequest, pb.ListModelsResponse.FromString
)
DESCRIBE = _rpc(
    _SERVICE + "DescribeModel",
    "unary_unary",
    pb.DescribeModelRequest,
    pb.DescribeModelResponse.FromString,
)
HEALTH = _rpc(
    "/grpc.health.v1.Health/Check",
    "unary_unary",
    health_pb2.HealthCheckRequest,
    health_pb2.HealthCheckResponse.FromString,
)
ANALYZE = _rpc(_SERVICE + "Analyze", "unary_stream", pb.AnalyzeRequest, decode_response)
ANALYZE_MANY = _rpc(
    _SERVICE + "AnalyzeMany", "stream_stream", pb.AnalyzeManyRequest, decode_many_response
)
ATTRIBUTE = _rpc(
    _SERVICE + "Attribute", "unary_stream", pb.AttributeRequest, pb.AttributeResponse.FromString
)
PERTURB = _rpc(
    _SERVICE + "Perturb", "unary_stream", pb.PerturbRequest, pb.PerturbResponse.FromString
)


def list_models(*, timeout: float | None = None) -> Call[list[ModelInfo]]:
    """The served models, sorted by name.

    Raises:
        GradtapError: the call failed; `.code` says how.
    """
    return Call(LIST_MODELS, pb.ListModelsRequest(), lambda _: Reply(model_infos), timeout)


def describe(
    model: str,
    *,
    version: str | None = None,
    digest: str | None = None,
    timeout: float | None = None,
) -> Call[ModelDescription]:
    """A model's inputs, outputs, nodes, module paths and parameters: those of `version`,
    or of the version whose digest is `digest`, or of the default version.

    Raises:
        GradtapError: NOT_FOUND for an unknown model or version, or another failure.
        ValueError: a version that is not [A-Za-z0-9][A-Za-z0-9._-]{0,63}; nothing was sent.
    """
    message = pb.DescribeModelRequest(model=model_ref(model, digest, version))
    return Call(DESCRIBE, message, lambda _: Reply(description), timeout)


def health(service: str = "", *, timeout: float | None = None) -> Call[str]:
    """The server's health: "SERVING", "NOT_SERVING", ...

    Raises:
        GradtapError: the server could not be reached.
    """
    message = health_pb2.HealthCheckRequest(service=service)
    return Call(HEALTH, message, lambda _: Reply(serving_status), timeout)


@legacy.accepts(legacy.renamed("analyze", input_grad="input_grads"))
def analyze(
    model: str,
    inputs: Inputs | None = None,
    targets: Targets = (),
    objective: Objective | None = None,
    *,
    input_grads: bool = False,
    activations: bool = False,
    outputs: bool = True,
    param_grads: str | Sequence[str] = (),
    version: str | None = None,
    digest: str | None = None,
    precision: str = "full",
    shared_memory: bool | SharedRegion = False,
    text: str | None = None,
    texts: Sequence[str] | None = None,
    timeout: float | None = None,
) -> Call[Result]:
    """Runs one forward and backward pass on the server.

    Args:
        model: the model's name.
        inputs: one array, or a list of arrays for a model with several inputs; None
            when sending text.
        targets: the nodes whose gradients (and activations) to return: a graph-node name
            or module path, a Target(name, reduce=..., dims=..., topk=..., dtype=...) to
            have them reduced on the server first, or a list of them; results are keyed by
            the names exactly as given.
        objective: the scalar to differentiate; required for gradients.
        input_grads: also return the gradient with respect to each float input.
        activations: also return each target's activation.
        outputs: also return the model's outputs.
        param_grads: state-dict names of parameters (describe() lists them), or "*" for
            all, whose gradients to return in Result.param_grads.
        version: the model version to run; the default version (the newest ready one,
            unless an operator pinned another) when None. metadata["model_version"] says
            which version computed the result.
        digest: fail unless the version that runs has this digest; without a version, the
            version with this digest runs.
        precision: "full", or "bfloat16" to run the forward pass under bf16 autocast
            (faster on GPUs; results carry about 3 significant digits).
        shared_memory: on the server's host, with a server started with
            --shared-memory: True to have the result written into a shared-memory
            region made for this call, or a SharedRegion to reuse (fastest; the arrays
            are then views of it, valid until its next use). See docs/shared-memory.md.
        text: instead of inputs, for a model whose archive carries its tokenizer
            (describe().has_tokenizer): one row of text, tokenized by the server.
            Result.tokens names the tokens it made.
        texts: several rows of text, padded by the server as the archive declares.
        timeout: deadline in seconds for this call.

    Returns:
        A complete Result; a stream cut short raises instead.

    Raises:
        GradtapError: INVALID_ARGUMENT (naming the field), NOT_FOUND, UNAVAILABLE, ...
        TypeError, ValueError: an argument the client cannot send; nothing was sent.
    """
    if not isinstance(shared_memory, (bool, SharedRegion)):
        raise TypeError("shared_memory must be True, False or a SharedRegion")
    wanted = as_targets(targets)
    rows = text_rows(inputs, text, texts)
    message = analyze_request(
        model,
        inputs if rows is None else [],
        wanted,
        objective,
        input_grads=input_grads,
        activations=activations,
        outputs=outputs,
        param_grads=param_grads,
        digest=digest,
        precision=precision,
        version=version,
    )
    message.texts.extend(rows or [])
    return Call(
        ANALYZE,
        message,
        lambda region: AnalysisAssembler(model, wanted, region),
        timeout,
        resend=True,
        model=model,
        shared_memory=shared_memory,
    )


@legacy.accepts(legacy.renamed("analyze_many", input_grad="input_grads", batches="items"))
def analyze_many(
    model: str,
    items: Iterable[Inputs],
    targets: Targets = (),
    objective: ObjectiveFor = None,
    *,
    input_grads: bool = False,
    activations: bool = False,
    outputs: bool = True,
    param_grads: str | Sequence[str] = (),
    aggregate: bool = False,
    per_item: bool = True,
    max_in_flight: int = 4,
    version: str | None = None,
    digest: str | None = None,
    precision: str = "full",
    timeout: float | None = None,
) -> ManyCall:
    """Analyzes many items over one stream; yields one Result per item, in order.

    Items are read from `items` and sent only as results come back, at most
    `max_in_flight` ahead, so a large dataset never sits in memory at once.

    Args:
        model: the model's name; the same for every item.
        items: an iterable of inputs, one per item: each an array (a batch for the model),
            or a tuple of arrays for a model with several inputs.
        targets, input_grads, activations, outputs, param_grads, version, digest,
            precision: as for analyze(), the same for every item. Every item runs on the
            version the first one got, even if the default changes meanwhile.
        objective: an Objective for every item, or a function of the item's position
            returning that item's Objective (e.g. its labels).
        aggregate: keep a running aggregate of every target's gradient on the server
            (mean gradient, mean |gradient| per channel); it arrives at the end in
            the returned stream's `.aggregate`. Targets must then have no reduction.
        per_item: send each item's tensors. With per_item=False (needs aggregate) the
            results carry only the loss and metadata: iterate them for progress.
        max_in_flight: items sent ahead of the results received.
        timeout: deadline in seconds for the whole stream.

    Returns:
        A ResultStream (an AsyncResultStream from the asyncio client): iterate it for the
        results; the stream starts on the first next(), and leaving it early (break,
        close() or the end of a with block) cancels it.

    Raises:
        GradtapError: while iterating. A failed item ends the stream: its error names
            the item in the field (items[K].inputs[0].shape) and the results before
            it have been yielded.
        TypeError, ValueError: for arguments that cannot work, at once; for bad items,
            while iterating.
    """
    wanted = as_targets(targets)
    flags: dict[str, Any] = {
        "input_grads": input_grads,
        "activations": activations,
        "outputs": outputs,
        "param_grads": param_grads,
    }
    options = many_options(aggregate, per_item, max_in_flight, flags)
    if objective is not None and not isinstance(objective, Objective) and not callable(objective):
        raise TypeError("objective must be an Objective, or a function of the item's position")
    requests = many_requests(
        model,
        items,
        wanted,
        objective,
        options,
        digest=digest,
        precision=precision,
        version=checked_version(version),
        **flags,
    )
    assembler = ManyAssembler(model, wanted)
    return ManyCall(ANALYZE_MANY, requests, assembler, max_in_flight, aggregate, timeout)


@legacy.accepts(legacy.attribute_arguments)
def attribute(
    model: str,
    inputs: Inputs,
    method: str,
    *,
    index: int | Sequence[int] | None = None,
    node: str | None = None,
    output: int | str = 0,
    n_steps: int | None = None,
    integration_method: str | None = None,
    baselines: Any = None,
    internal_batch_size: int | None = None,
    nt_samples: int | None = None,
    nt_samples_batch_size: int | None = None,
    stdevs: float | None = None,
    seed: int | None = None,
    abs: bool | None = None,
    relu_attributions: bool | None = None,
    attr_dim_summation: bool | None = None,
    multiply_by_inputs: bool | None = None,
    version: str | None = None,
    digest: str | None = None,
    timeout: float | None = None,
) -> Call[AttributionResult]:
    """Attributes a model output to its input, or to a node, with a Captum method.

    The method's parameters keep Captum's names and defaults (None means Captum's
    default); the server refuses a parameter the method does not take.

    Args:
        model: the model's name.
        inputs: one array, or a list of arrays for a model with several inputs; the
            one floating-point input is attributed, the others are held fixed.
        method: saliency, input_x_gradient, integrated_gradients, smoothgrad,
            guided_backprop, layer_gradient_x_activation, layer_grad_cam,
            layer_integrated_gradients or layer_conductance.
        index: the class to attribute, Captum's `target`: one class index for every row,
            or one per row; None when the output has one value per row.
        node: for layer methods, the node attributed to: a graph-node name or module path.
        output: which output, for models that return several: its position, or its name
            as describe() gives it ("logits").
        n_steps: integration steps (integrated gradients, layer IG, conductance).
        integration_method: Captum's `method`, the integration rule: gausslegendre,
            riemann_left, riemann_right, riemann_middle or riemann_trapezoid.
        baselines: a number, one row, or an array shaped like the input.
        internal_batch_size: rows per forward pass of the integration steps.
        nt_samples, nt_samples_batch_size, stdevs: smoothgrad's noise samples, samples
            per pass and noise standard deviation.
        seed: smoothgrad's noise seed, for a reproducible attribution; without one the
            server draws one and reports it in metadata["seed"].
        abs: saliency and smoothgrad: absolute values.
        relu_attributions, attr_dim_summation: Grad-CAM's.
        multiply_by_inputs: integrated gradients', layer IG's, gradient x activation's.
        version, digest: the model version to run, as for analyze().
        timeout: deadline in seconds for this call.

    Returns:
        An AttributionResult: `.attribution`, shaped like the input (or like the node for
        layer methods), and `.metadata`.

    Raises:
        GradtapError: INVALID_ARGUMENT naming the field (params.n_steps, node, ...),
            NOT_FOUND, UNAVAILABLE, ...
        TypeError, ValueError: an argument the client cannot encode; nothing was sent.
    """
    picked = output_fields(output)
    given = arrays(inputs)
    params = {
        "n_steps": n_steps,
        "integration_method": integration_method,
        "baselines": baselines,
        "internal_batch_size": internal_batch_size,
        "nt_samples": nt_samples,
        "nt_samples_batch_size": nt_samples_batch_size,
        "stdevs": stdevs,
        "seed": seed,
        "abs": abs,
        "relu_attributions": relu_attributions,
        "attr_dim_summation": attr_dim_summation,
        "multiply_by_inputs": multiply_by_inputs,
    }
    message = pb.AttributeRequest(
        model=model_ref(model, digest, version),
        inputs=[encode(a) for a in given],
        method=choice(ATTRIBUTION_METHODS, method, "method"),
        index=class_index(index),
        node=node or "",
        **picked,
        params=attribution_params(params, given),
    )
    return Call(ATTRIBUTE, message, lambda _: AttributionAssembler(model, method, node), timeout)


@legacy.accepts(legacy.perturb_arguments)
def perturb(
    model: str,
    inputs: Inputs,
    method: str,
    objective: Objective,
    *,
    epsilon: float,
    step_size: float | None = None,
    steps: int | None = None,
    norm: str = "Linf",
    targeted: bool = False,
    clamp: tuple[float | None, float | None] | None = None,
    random_start: bool = False,
    seed: int | None = None,
    mask: Any = None,
    zero_threshold: float | None = None,
    on_step: OnStep | None = None,
    version: str | None = None,
    digest: str | None = None,
    timeout: float | None = None,
) -> Call[PerturbResult]:
    """Runs an adversarial loop on the server, with Captum's FGSM and PGD semantics.

    Args:
        model: the model's name.
        inputs: one array, or a list of arrays; the one floating-point input is
            perturbed, the others are held fixed.
        method: "fgsm" (one step of size epsilon) or "pgd".
        objective: the loss to follow; it may sit on an intermediate node.
        epsilon: FGSM's step size; PGD's radius around the input.
        step_size: PGD's step size.
        steps: PGD's number of steps (at most 1000).
        norm: PGD's ball: "Linf" or "L2".
        targeted: False ascends the objective (an untargeted attack maximizes the
            loss); True descends it.
        clamp: (low, high) bounds of the input's values; either may be None.
        random_start: PGD starts from a uniform random point of the ball.
        seed: the random start's seed, for a reproducible one; without one the server
            draws one and reports it in metadata["seed"].
        mask: 0/1 array shaped like the input: which elements may move.
        zero_threshold: gradient elements at or below it do not move; Captum's 1e-6
            by default.
        on_step: called with (step, loss) as each step finishes on the server (the
            asyncio client also awaits a coroutine function); if it raises, the call
            is cancelled.
        version, digest: the model version to run, as for analyze().
        timeout: deadline in seconds for this call.

    Returns:
        A PerturbResult: adversarial, losses, objective_before, objective_after, metadata.

    Raises:
        GradtapError: INVALID_ARGUMENT naming the field (epsilon, steps, objective...),
            NOT_FOUND, UNAVAILABLE, ...
        TypeError, ValueError: an argument the client cannot send (a missing objective,
            say); nothing was sent.
    """
    if objective_or_none(objective) is None:
        raise TypeError("perturb needs an objective, built with gradtap.client.Objective")
    given = arrays(inputs)
    message = pb.PerturbRequest(
        model=model_ref(model, digest, version),
        inputs=[encode(a) for a in given],
        method=choice(PERTURB_METHODS, method, "method"),
        objective=objective.message,
        epsilon=float(epsilon),
        step_size=float(step_size or 0.0),
        steps=int(steps or 0),
        norm=choice(NORMS, norm, "norm"),
        targeted=bool(targeted),
        random_start=bool(random_start),
        seed=None if seed is None else int(seed),
        mask=None if mask is None else encode(float_like(given, mask)),
        zero_threshold=None if zero_threshold is None else float(zero_threshold),
    )
    low, high = (None, None) if clamp is None else clamp
    if low is not None:
        message.lower_bound = float(low)
    if high is not None:
        message.upper_bound = float(high)
    return Call(
        PERTURB, message, lambda _: PerturbAssembler(model, method), timeout, on_step=on_step
    )
