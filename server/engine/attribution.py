"""Attribution methods on served models: Captum's algorithms over the exported graph.

This module checks an attribution request against its model and runs it; the graph Captum
hooks, and the calls into Captum, are in engine/captum_bridge.py.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import captum
import torch

from ..errors import Cancelled, InvalidArgument, ResourceExhausted
from ..models.model import Dim, Model, dims_text, dtype_name
from .captum_bridge import INTEGRATION_METHODS, ModelForward, call, rewritten_graph
from .graph import ShouldStop, never, release
from .memory import Estimate, attribution_bytes, check_batch_parameter

CAPTUM_VERSION: str = captum.__version__

MAX_STEPS = 4096
"""Most integration steps (n_steps) one call may ask for."""

MAX_NT_SAMPLES = 1024
"""Most noisy samples per row (nt_samples) one call may ask for."""

ACTIVATION_BUDGET_BYTES = 256 << 20
"""Activation memory one forward pass over integration steps may take when the caller
leaves internal_batch_size unset: the server batches the steps to stay within it."""

_INTEGRATION = frozenset({"n_steps", "method", "baselines", "internal_batch_size"})


@dataclass(frozen=True)
class Method:
    """What an attribution method needs: a layer or not, and which parameters it takes."""

    layer: bool
    params: frozenset[str]
    scales_input: bool = True
    """False where Captum only runs the model forward on the inputs (gradients are taken
    at the layer), so inputs of any dtype can be passed as they are."""


METHODS: dict[str, Method] = {
    "saliency": Method(False, frozenset({"abs"})),
    "input_x_gradient": Method(False, frozenset()),
    "integrated_gradients": Method(False, _INTEGRATION | {"multiply_by_inputs"}),
    "smoothgrad": Method(
        False, frozenset({"nt_samples", "nt_samples_batch_size", "stdevs", "seed", "abs"})
    ),
    "guided_backprop": Method(False, frozenset()),
    "layer_gradient_x_activation": Method(
        True, frozenset({"multiply_by_inputs"}), scales_input=False
    ),
    "layer_grad_cam": Method(
        True, frozenset({"relu_attributions", "attr_dim_summation"}), scales_input=False
    ),
    "layer_integrated_gradients": Method(True, _INTEGRATION | {"multiply_by_inputs"}),
    "layer_conductance": Method(True, _INTEGRATION),
}
"""Method name (as the client spells it) -> what it takes."""


@dataclass(frozen=True)
class Attribution:
    """One attribution, as the caller asked for it.

    `params` holds only the parameters the caller set, named as Captum names them (errors
    name them as `params.<name>`); the rest take Captum's defaults.
    """

    inputs: Sequence[torch.Tensor]
    method: str
    target: tuple[int, ...] = ()
    output: int = 0
    layer: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Attributed:
    """The attribution, on the host, and how it was computed."""

    tensor: torch.Tensor
    index: int
    """The attributed input's position; 0 for layer methods."""
    device: str
    seed: int = 0
    internal_batch_size: int = 0
    compute_ms: float = 0.0


@dataclass(frozen=True)
class _Plan:
    """A checked request: everything the run needs, with Captum's defaults filled in."""

    method: Method
    attributed: int | None
    """Position of the floating-point input Captum attributes or scales; None when every
    input is passed to Captum as it is (layer methods that only run forward)."""
    layer: str | None
    target: int | list[int] | None
    params: dict[str, Any]


def attribute(
    device: torch.device,
    model: Model,
    request: Attribution,
    should_stop: ShouldStop = never,
    share: int | None = None,
) -> Attributed:
    """Runs one attribution; raises RequestError subclasses on bad requests.

    The inputs must fit the model (Model.check_inputs; the wire checks them). `share` bounds
    the bytes of one forward pass (see `passes`); None leaves it unbounded.
    """
    plan = _plan(model, request)
    if should_stop():
        raise Cancelled("the call was cancelled", reason="CANCELLED")
    try:
        return _run(device, model, request, plan, should_stop, share)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise ResourceExhausted(
            "the device ran out of memory for this attribution; send a smaller batch or a "
            "smaller internal_batch_size",
            reason="DEVICE_OUT_OF_MEMORY",
        ) from None


def working_memory(model: Model, request: Attribution, share: int | None = None) -> Estimate:
    """Checks the request as `attribute` would, and estimates its peak working memory."""
    _plan(model, request)
    batching = passes(model, request, share)
    return attribution_bytes(model, request.inputs, batching.rows, batching.shrink)


# -- request checks -------------------------------------------------------------------------


def _plan(model: Model, request: Attribution) -> _Plan:
    method = METHODS.get(request.method)
    if method is None:
        raise InvalidArgument(
            f"unknown attribution method {request.method[:80]!r}; use one of " + ", ".join(METHODS),
            reason="UNKNOWN_METHOD",
            field="method",
        )
    if request.output >= len(model.outputs):
        raise InvalidArgument(
            f"output {request.output} does not exist: {model.name} has "
            f"{len(model.outputs)} output(s)",
            reason="UNKNOWN_OUTPUT",
            field="output",
        )
    params = _params(request, method)

    floating = [i for i, t in enumerate(request.inputs) if t.is_floating_point()]
    attributed: int | None = None
    if request.method == "layer_integrated_gradients" and not floating and request.inputs:
        # Layer IG only runs the model on its inputs and baselines: on a token model the
        # first input (token ids) takes the baseline (e.g. padding ids), as in Captum's
        # text tutorials, and the rest (masks) are held fixed.
        attributed = 0
    elif method.scales_input:
        if len(floating) != 1:
            raise InvalidArgument(
                f"{request.method} needs the model to have one floating-point input, to "
                f"attribute or scale, and {model.name} has {len(floating)}; "
                "layer_gradient_x_activation and layer_grad_cam take any inputs",
                reason="NEEDS_ONE_FLOAT_INPUT",
                field="inputs",
            )
        attributed = floating[0]

    layer = _layer(model, request, method)
    if "baselines" in params:
        assert attributed is not None
        params["baselines"] = _baselines(params["baselines"], request.inputs[attributed])
    return _Plan(method, attributed, layer, _target(model, request), params)


def _params(request: Attribution, method: Method) -> dict[str, Any]:
    """Checks every parameter set against the method and its range."""
    params = dict(request.params)
    for name in params:
        if name not in method.params:
            takes = ", ".join(sorted(method.params)) or "no parameters"
            raise InvalidArgument(
                f"{request.method} does not take {name}; it takes {takes}",
                reason="BAD_PARAMETER",
                field=f"params.{name}",
            )

    def bounded(name: str, low: int, high: int | None = None) -> None:
        value = params.get(name)
        if value is not None and (value < low or (high is not None and value > high)):
            span = f"in [{low}, {high}]" if high is not None else f"at least {low}"
            raise InvalidArgument(
                f"{name} is {value}; it must be {span}",
                reason="OUT_OF_RANGE",
                field=f"params.{name}",
            )

    bounded("n_steps", 1, MAX_STEPS)
    bounded("internal_batch_size", 1)
    bounded("nt_samples", 1, MAX_NT_SAMPLES)
    bounded("nt_samples_batch_size", 1)
    if "method" in params and params["method"] not in INTEGRATION_METHODS:
        raise InvalidArgument(
            f"unknown integration method {str(params['method'])[:40]!r}; use one of "
            + ", ".join(INTEGRATION_METHODS),
            reason="BAD_PARAMETER",
            field="params.method",
        )
    stdevs = params.get("stdevs")
    if stdevs is not None and not (math.isfinite(stdevs) and stdevs >= 0):
        raise InvalidArgument(
            f"stdevs is {stdevs}; it must be a finite number >= 0",
            reason="OUT_OF_RANGE",
            field="params.stdevs",
        )
    return params


def _layer(model: Model, request: Attribution, method: Method) -> str | None:
    if not method.layer:
        if request.layer:
            raise InvalidArgument(
                f"{request.method} attributes to the input and takes no layer; the layer "
                "methods are " + ", ".join(m for m, spec in METHODS.items() if spec.layer),
                reason="BAD_PARAMETER",
                field="node",
            )
        return None
    if not request.layer:
        raise InvalidArgument(
            f"{request.method} needs a layer: a graph node or module path (DescribeModel "
            "lists them)",
            reason="LAYER_REQUIRED",
            field="node",
        )
    node = model.resolve(request.layer)
    if node is None:
        raise InvalidArgument(
            f"unknown node {request.layer[:80]!r}: not a graph node or module path of "
            f"{model.name} (DescribeModel lists them)",
            reason="UNKNOWN_TARGET",
            field="node",
        )
    if not model.nodes[node].differentiable:
        raise InvalidArgument(
            f"layer {request.layer[:80]!r} has dtype "
            f"{dtype_name(model.nodes[node].spec.dtype)}; it has no gradient",
            reason="NOT_DIFFERENTIABLE",
            field="node",
        )
    return node


def _target(model: Model, request: Attribution) -> int | list[int] | None:
    """Captum's target: one class index for every row, or one per row."""
    dims = model.outputs[request.output].dims
    rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].dim() else 1
    target = list(request.target)
    if not target:
        per_row = math.prod(d.size if d.size is not None else 2 for d in dims[1:])
        if per_row != 1:
            raise InvalidArgument(
                f"output {request.output} has shape {_shape(dims)}: name the class to "
                "attribute with index (one index for every row, or one per row)",
                reason="TARGET_REQUIRED",
                field="index",
            )
        return None
    if len(dims) != 2:
        raise InvalidArgument(
            f"index picks a class from an output of shape (N, C); output {request.output} "
            f"has shape {_shape(dims)}",
            reason="BAD_TARGET",
            field="index",
        )
    classes = dims[1].size
    if classes is not None and any(t < 0 or t >= classes for t in target):
        raise InvalidArgument(
            f"index must lie in [0, {classes})", reason="OUT_OF_RANGE", field="index"
        )
    if len(target) == 1:
        return target[0]
    if len(target) != rows:
        raise InvalidArgument(
            f"index has {len(target)} values: give one, or one per row ({rows})",
            reason="BAD_TARGET",
            field="index",
        )
    return target


def _baselines(baselines: torch.Tensor, reference: torch.Tensor) -> torch.Tensor | float | int:
    """A scalar, one row (1, ...) or the input's shape, of the input's dtype."""
    if baselines.dtype != reference.dtype:
        raise InvalidArgument(
            f"baselines have dtype {dtype_name(baselines.dtype)}; the input "
            f"has {dtype_name(reference.dtype)}",
            reason="WRONG_DTYPE",
            field="params.baselines.dtype",
        )
    shape = tuple(baselines.shape)
    if shape == ():
        return baselines.item()  # Captum takes a Python number for "every element"
    if shape not in (tuple(reference.shape), (1, *reference.shape[1:])):
        raise InvalidArgument(
            f"baselines have shape {list(shape)}; give a scalar, shape "
            f"{[1, *reference.shape[1:]]} or the input's shape {list(reference.shape)}",
            reason="WRONG_SHAPE",
            field="params.baselines.shape",
        )
    return baselines


def _shape(dims: Sequence[Dim]) -> str:
    return dims_text(dims)


# -- the run --------------------------------------------------------------------------------


def _run(
    device: torch.device,
    model: Model,
    request: Attribution,
    plan: _Plan,
    should_stop: ShouldStop,
    share: int | None,
) -> Attributed:
    started = time.perf_counter()
    inputs = [t.to(device) for t in request.inputs]
    if plan.attributed is None:
        order = list(range(len(inputs)))
    else:
        order = [plan.attributed] + [i for i in range(len(inputs)) if i != plan.attributed]
    graph = rewritten_graph(
        model, request.output, plan.layer, guided=request.method == "guided_backprop"
    )
    forward = ModelForward(
        graph,
        [v for _, v, _ in model.state],
        [order.index(j) for j in range(len(inputs))],
        should_stop,
    )
    if plan.attributed is None:
        captum_inputs: tuple[torch.Tensor, ...] = tuple(inputs)
        held: tuple[torch.Tensor, ...] = ()
    else:
        # Captum would set requires_grad itself, with a warning on every call.
        attributed = inputs[plan.attributed].detach()
        if attributed.is_floating_point():
            attributed.requires_grad_(True)
        captum_inputs = (attributed,)
        held = tuple(inputs[i] for i in order[1:])
    index = 0 if plan.method.layer or plan.attributed is None else plan.attributed
    result = Attributed(tensor=torch.empty(0), index=index, device=str(device))
    params = dict(plan.params)
    batching = passes(model, request, share)
    params.update(batching.params)
    result.internal_batch_size = batching.internal_batch_size
    if request.method == "smoothgrad":
        result.seed = params.get("seed", secrets.randbits(63))
        params["seed"] = result.seed
    try:
        with torch.enable_grad():
            attribution = call(request.method, forward, captum_inputs, held, plan.target, params)
    except (RuntimeError, IndexError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        # Inputs of the right dtype and shape can still hold values the model cannot take
        # (token ids past the vocabulary), and the batch Captum builds (integration steps,
        # noisy samples) can be one the model cannot take, e.g. a model exported with a
        # static batch size. torch's message may carry source paths, so only the exception
        # type is passed on.
        raise InvalidArgument(
            f"the model could not run on these inputs, or on the batch {request.method} "
            f"builds from them ({type(e).__name__}); check the input values (token ids "
            "within the vocabulary), and that the model takes any batch size",
            reason="MODEL_REJECTED_INPUT",
            field="inputs",
        ) from e
    finally:
        release(graph)  # a fresh graph per call: drop the source torch.fx caches for it
    result.tensor = attribution.detach().to("cpu").contiguous()
    result.compute_ms = (time.perf_counter() - started) * 1e3
    return result


@dataclass(frozen=True)
class Passes:
    """How an attribution batches its work: the batch parameters it runs with, and the rows
    of its largest forward pass (what its working memory grows with)."""

    params: dict[str, Any]
    rows: int
    internal_batch_size: int = 0
    shrink: str = "inputs (the batch)"
    """The request field that makes the passes smaller, for a memory-budget refusal."""


def passes(model: Model, request: Attribution, share: int | None = None) -> Passes:
    """The batching of an attribution, its passes bounded by `share` bytes (None: unbounded).

    Captum's internal_batch_size only splits the integration steps into passes, so a
    caller's value over what `share` allows is lowered to it (the attribution is the same up
    to float rounding, and the response reports the value used). nt_samples_batch_size also
    decides which noise each row draws from the seed, so a value over the share is refused
    (OUT_OF_RANGE, naming the most allowed) rather than silently changing the result.
    """
    rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].dim() else 1
    per_row = 2 * _row_bytes(model)
    fits = max(1, ACTIVATION_BUDGET_BYTES // per_row)
    # A pass runs without a stop between its operators: the default bounds it in time too.
    largest = None if share is None else max(1, min(share, ACTIVATION_BUDGET_BYTES) // per_row)
    if largest is not None:
        fits = min(fits, largest)
    given = request.params
    if request.method in (
        "integrated_gradients",
        "layer_integrated_gradients",
        "layer_conductance",
    ):
        pairs = request.method == "layer_conductance"
        chosen, used = _internal_batch_size(given, rows, fits, pairs, largest)
        total = (int(given.get("n_steps", 50)) + (1 if pairs else 0)) * rows
        shrink = "params.internal_batch_size or the batch (inputs)"
        return Passes({"internal_batch_size": chosen}, min(used, total), used, shrink)
    if request.method == "smoothgrad":
        samples = int(given.get("nt_samples", 5))
        wanted = given.get("nt_samples_batch_size")
        if wanted is None:
            batch = max(1, min(samples, fits // rows))
            return Passes({"nt_samples_batch_size": batch}, batch * rows)
        batch = min(samples, int(wanted))
        if largest is not None and batch * rows > largest:
            most = max(1, largest // rows)
            if most < batch:
                check_batch_parameter(
                    "nt_samples_batch_size",
                    int(wanted),
                    most,
                    f"{rows} rows a sample; it also decides the noise drawn from the seed, so "
                    "it is not lowered for you",
                )
        return Passes({}, batch * rows, shrink="params.nt_samples_batch_size or the batch (inputs)")
    return Passes({}, rows)


def _internal_batch_size(
    params: Mapping[str, Any],
    rows: int,
    fits: int,
    pairs: bool = False,
    largest: int | None = None,
) -> tuple[int | None, int]:
    """Captum's internal_batch_size, and the rows each forward pass will take.

    The caller's value (lowered to `largest` rows), else None (one pass over every step, as
    Captum does by default) when every step fits `fits` rows, else `fits`. Captum raises a
    value below the batch size to the batch size (twice that for conductance, which
    differences consecutive steps); raising it here keeps Captum's warning out of the log.
    """
    least = rows * (2 if pairs else 1)
    given = params.get("internal_batch_size")
    if given is not None:
        chosen = max(min(int(given), largest or int(given)), least)
        return chosen, chosen
    total = (int(params.get("n_steps", 50)) + (1 if pairs else 0)) * rows
    if total <= fits:
        return None, total
    chosen = max(fits, least)
    return chosen, chosen


def _row_bytes(model: Model) -> int:
    """Bytes of every node's value for one row: the activation memory a row costs."""
    total = 0
    for info in model.nodes.values():
        elements = math.prod(d.size if d.size is not None else 1 for d in info.spec.dims[1:])
        total += elements * info.spec.dtype.itemsize
    return max(total, 1)
