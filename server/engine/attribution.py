"""Attribution methods on served models: Captum's algorithms over the exported graph.

Captum hooks nn.Modules, and an exported program has none: its flat graph calls aten
operators. Each call therefore copies the graph and rewrites the copy so that Captum finds
what it hooks. A layer gets an nn.Identity right after its node, so a graph node and a
module path are layers alike; for guided backprop every aten.relu becomes an nn.ReLU
module. The copy is built per call (well under a millisecond for the seed models), so the
hooks Captum registers never touch a module that another call is running.

The engine knows nothing of gRPC, and neither does this module.
"""

from __future__ import annotations

import functools
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import captum
import torch
from captum.attr import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerConductance,
    LayerGradCam,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    Saliency,
)
from torch import nn

from ..errors import Cancelled, InvalidArgument, ResourceExhausted
from ..models.model import Model, dtype_name
from .graph import ShouldStop, never, release

CAPTUM_VERSION: str = captum.__version__

MAX_STEPS = 4096
"""Most integration steps (n_steps) one call may ask for."""

MAX_NT_SAMPLES = 1024
"""Most noisy samples per row (nt_samples) one call may ask for."""

ACTIVATION_BUDGET_BYTES = 256 << 20
"""Activation memory one forward pass over integration steps may take when the caller
leaves internal_batch_size unset: the server batches the steps to stay within it."""

INTEGRATION_METHODS = (
    "gausslegendre",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
)
"""Captum's names for the integration rules; the first is its default."""

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
) -> Attributed:
    """Runs one attribution; raises RequestError subclasses on bad requests.

    The inputs must fit the model (Model.check_inputs; the wire checks them).
    """
    plan = _plan(model, request)
    if should_stop():
        raise Cancelled("the call was cancelled", reason="CANCELLED")
    try:
        return _run(device, model, request, plan, should_stop)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise ResourceExhausted(
            "the device ran out of memory for this attribution; send a smaller batch or a "
            "smaller internal_batch_size",
            reason="DEVICE_OUT_OF_MEMORY",
        ) from None


# -- request checks ---------------------------------------------------------------------------


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


def _shape(dims: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d.size) if d.size is not None else "N" for d in dims) + ")"


# -- the model as a module Captum can hook ----------------------------------------------------

LAYER_MODULE = "gradtap_layer"
"""The nn.Identity inserted after the layer's node; Captum hooks it."""


class ModelForward(nn.Module):
    """The model's flat graph as a module: forward(*captum_inputs, *held) -> one output.

    `slots[j]` is the forward argument that feeds model input j, so the attributed input
    can come first (Captum's `inputs`) and the rest follow (its additional_forward_args).
    Every call checks `should_stop`, so a cancelled call stops between Captum's batches.
    """

    def __init__(
        self,
        graph: torch.fx.GraphModule,
        state: Sequence[torch.Tensor],
        slots: Sequence[int],
        should_stop: ShouldStop = never,
    ) -> None:
        super().__init__()
        self.graph = graph
        self._state = tuple(state)
        self._slots = tuple(slots)
        self._should_stop = should_stop

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self._should_stop():
            raise Cancelled("the call was cancelled", reason="CANCELLED")
        result = self.graph(*self._state, *(args[k] for k in self._slots))
        assert isinstance(result, torch.Tensor)
        return result

    @property
    def layer(self) -> nn.Module:
        """The identity module standing for the layer."""
        return self.graph.get_submodule(LAYER_MODULE)


def rewritten_graph(
    model: Model, output: int, layer: str | None = None, guided: bool = False
) -> torch.fx.GraphModule:
    """A copy of the model's flat graph returning one output, with an identity module after
    `layer` and, when `guided`, every aten.relu replaced by an nn.ReLU module."""
    source = model.program.graph
    graph = torch.fx.Graph()
    copied: dict[torch.fx.Node, torch.fx.Node] = {}
    flat = graph.graph_copy(source, copied)
    assert isinstance(flat, (tuple, list))
    result = flat[model.output_positions[output]]
    root: dict[str, Any] = {
        str(old.target): functools.reduce(
            getattr, str(old.target).split("."), model.program.graph_module
        )
        for old in source.nodes
        if old.op == "get_attr"
    }
    if layer is not None:
        node = next(new for old, new in copied.items() if old.name == layer)
        anchor = node
        if node.op == "placeholder":  # a model input: tap it after the last placeholder
            anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(anchor):
            tap = graph.call_module(LAYER_MODULE, (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)
        root[LAYER_MODULE] = nn.Identity()
        result = tap if result is node else result
    if guided:
        relus = [
            n
            for n in graph.nodes
            if n.op == "call_function" and n.target is torch.ops.aten.relu.default
        ]
        for i, node in enumerate(relus):
            name = f"gradtap_relu_{i}"
            with graph.inserting_after(node):
                module_call = graph.call_module(name, (node.args[0],))
            node.replace_all_uses_with(module_call)
            graph.erase_node(node)
            root[name] = nn.ReLU()
            result = module_call if result is node else result
    graph.output(result)
    return torch.fx.GraphModule(root, graph)


# -- the run ----------------------------------------------------------------------------------


def _run(
    device: torch.device,
    model: Model,
    request: Attribution,
    plan: _Plan,
    should_stop: ShouldStop,
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
    rows = captum_inputs[0].shape[0] if captum_inputs[0].dim() else 1
    fits = max(1, ACTIVATION_BUDGET_BYTES // (2 * _row_bytes(model)))
    if request.method in ("integrated_gradients", "layer_integrated_gradients"):
        params["internal_batch_size"], result.internal_batch_size = _internal_batch_size(
            params, rows, fits
        )
    elif request.method == "layer_conductance":
        params["internal_batch_size"], result.internal_batch_size = _internal_batch_size(
            params, rows, fits, pairs=True
        )
    elif request.method == "smoothgrad":
        result.seed = params.get("seed", secrets.randbits(63))
        params["seed"] = result.seed
        if params.get("nt_samples_batch_size") is None:
            samples = int(params.get("nt_samples", 5))
            params["nt_samples_batch_size"] = max(1, min(samples, fits // rows))
    try:
        with torch.enable_grad():
            attribution = _captum(request.method, forward, captum_inputs, held, plan, params)
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


def _internal_batch_size(
    params: Mapping[str, Any], rows: int, fits: int, pairs: bool = False
) -> tuple[int | None, int]:
    """Captum's internal_batch_size, and the rows each forward pass will take.

    The caller's value, else None (one pass over every step, as Captum does by default)
    when every step fits `fits` rows, else `fits`. Captum raises a value below the batch
    size to the batch size (twice that for conductance, which differences consecutive
    steps); raising it here keeps Captum's warning out of the log.
    """
    least = rows * (2 if pairs else 1)
    given = params.get("internal_batch_size")
    if given is not None:
        chosen = max(int(given), least)
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


def _captum(
    method: str,
    forward: ModelForward,
    inputs: tuple[torch.Tensor, ...],
    held: tuple[torch.Tensor, ...],
    plan: _Plan,
    params: dict[str, Any],
) -> torch.Tensor:
    """Calls Captum's method with Captum's own parameter names and defaults."""
    target = plan.target
    extra = held or None
    x = inputs[0]
    integration = {
        "n_steps": params.get("n_steps", 50),
        "method": params.get("method", INTEGRATION_METHODS[0]),
        "internal_batch_size": params.get("internal_batch_size"),
    }
    baselines = params.get("baselines")
    if isinstance(baselines, torch.Tensor):
        baselines = baselines.to(x.device)
    result: Any
    if method == "saliency":
        result = Saliency(forward).attribute(
            x, target=target, abs=params.get("abs", True), additional_forward_args=extra
        )
    elif method == "input_x_gradient":
        result = InputXGradient(forward).attribute(x, target=target, additional_forward_args=extra)
    elif method == "integrated_gradients":
        ig = IntegratedGradients(forward, multiply_by_inputs=params.get("multiply_by_inputs", True))
        result = ig.attribute(
            x, baselines=baselines, target=target, additional_forward_args=extra, **integration
        )
    elif method == "smoothgrad":
        result = _smoothgrad(forward, x, target, held, params)
    elif method == "guided_backprop":
        result = GuidedBackprop(forward).attribute(x, target=target, additional_forward_args=extra)
    elif method == "layer_gradient_x_activation":
        lgxa = LayerGradientXActivation(
            forward, forward.layer, multiply_by_inputs=params.get("multiply_by_inputs", True)
        )
        result = lgxa.attribute(inputs, target=target, additional_forward_args=extra)
    elif method == "layer_grad_cam":
        result = LayerGradCam(forward, forward.layer).attribute(
            inputs,
            target=target,
            additional_forward_args=extra,
            relu_attributions=params.get("relu_attributions", False),
            attr_dim_summation=params.get("attr_dim_summation", True),
        )
    elif method == "layer_integrated_gradients":
        lig = LayerIntegratedGradients(
            forward, forward.layer, multiply_by_inputs=params.get("multiply_by_inputs", True)
        )
        result = lig.attribute(
            x, baselines=baselines, target=target, additional_forward_args=extra, **integration
        )
    elif method == "layer_conductance":
        result = LayerConductance(forward, forward.layer).attribute(
            x, baselines=baselines, target=target, additional_forward_args=extra, **integration
        )
    else:  # METHODS and this chain list the same names
        raise AssertionError(method)
    assert isinstance(result, torch.Tensor)
    return result


def _smoothgrad(
    forward: ModelForward,
    x: torch.Tensor,
    target: int | list[int] | None,
    held: tuple[torch.Tensor, ...],
    params: Mapping[str, Any],
) -> torch.Tensor:
    """Captum's NoiseTunnel(Saliency) with nt_type "smoothgrad", noise from a seeded generator.

    NoiseTunnel draws its noise from torch's global generator, which every thread of the
    server shares: seeding it would be neither thread-safe nor reproducible. This loop does
    what NoiseTunnel does, in the same order (batches of nt_samples_batch_size, then the
    remainder), drawing from a private CPU generator. On the CPU the noise is exactly what
    torch.manual_seed(seed) followed by NoiseTunnel would draw, and on any device a seed
    gives the same noise.
    """
    samples = int(params.get("nt_samples", 5))
    batch = min(samples, int(params.get("nt_samples_batch_size") or samples))
    stdev = float(params.get("stdevs", 1.0))
    generator = torch.Generator().manual_seed(int(params["seed"]))
    saliency = Saliency(forward)
    rows = x.shape[0]
    total: torch.Tensor | None = None
    done = 0
    while done < samples:
        k = min(batch, samples - done)
        shape = (rows * k, *x.shape[1:])
        with torch.no_grad():
            noise = torch.normal(0.0, torch.full(shape, stdev), generator=generator)
            noisy = (x.repeat_interleave(k, dim=0) + noise.to(x.device)).requires_grad_(True)
        expanded = [t for t in target for _ in range(k)] if isinstance(target, list) else target
        extra = tuple(t.repeat_interleave(k, dim=0) if t.dim() else t for t in held)
        attribution = saliency.attribute(
            noisy,
            target=expanded,
            abs=params.get("abs", True),
            additional_forward_args=extra or None,
        )
        part = attribution.detach().view(rows, k, *attribution.shape[1:]).sum(dim=1)
        total = part if total is None else total + part
        done += k
    assert total is not None
    return total * 1 / samples
