"""One forward and backward pass: what a request asks for, the plan it resolves to, the run.

The engine runs a graph variant (engine/graph.py) that returns every requested node beside
the model's outputs, so `torch.autograd.grad` on those gives exactly what `retain_grad()`
would. A request's targets, objective site and parameter names resolve to a plan once per
model and request shape; later requests of that shape look it up.

Precondition: a request's inputs fit its model (`Model.check_inputs`). Every request the wire
decodes was checked there, before anything was allocated; in-process callers (batching,
adversarial loops, attribution) build only inputs that fit. The engine does not check again.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import Cancelled, InvalidArgument, ResourceExhausted
from ..models.model import Model, bindings, dtype_name, shape_of
from . import graph
from . import reduce as _reduce
from .compute import Compute
from .graph import ShouldStop, never
from .objectives import Objective, check, loss

PLANS_PER_MODEL = 256
"""Resolved request plans kept per model (one per distinct set of targets and objective site)."""


class Role(enum.Enum):
    """What a returned tensor is."""

    ACTIVATION = "activation"
    GRADIENT = "gradient"
    INPUT_GRADIENT = "input_gradient"
    OUTPUT = "output"
    PARAMETER_GRADIENT = "parameter_gradient"
    TOPK_INDICES = "topk_indices"
    MEAN_GRADIENT = "mean_gradient"
    MEAN_ABS_GRADIENT = "mean_abs_gradient"
    ATTRIBUTION = "attribution"
    ADVERSARIAL = "adversarial"
    ATTRIBUTION_PATCHING = "attribution_patching"


@dataclass(frozen=True)
class Target:
    """A node to capture, named as the caller named it (graph node or module path)."""

    name: str
    activation: bool = False
    gradient: bool = True
    reduction: _reduce.Reduction | None = None
    """Reduced on the device before the host copy (engine/reduce.py); None sends it whole."""
    patching: bool = False
    """Attribution patching: (activation at corrupt_inputs - activation) * gradient."""


@dataclass(frozen=True)
class Analysis:
    """One forward and backward pass, as the caller asked for it."""

    inputs: Sequence[torch.Tensor]
    targets: Sequence[Target] = ()
    objective: Objective | None = None
    param_grads: Sequence[str] = ()
    """State-dict names of parameters whose gradients to return; "*" means all of them."""
    input_gradients: bool = False
    outputs: bool = False
    autocast: bool = False
    """Run the forward pass under torch.autocast(bfloat16)."""
    corrupt_inputs: Sequence[torch.Tensor] = ()
    """Attribution patching: inputs shaped like `inputs`, run forward without gradients."""


@dataclass(frozen=True)
class Collected:
    """One tensor of the result, on the host."""

    role: Role
    name: str
    index: int
    tensor: torch.Tensor
    reduction: _reduce.Applied | None = None
    """The reduction this tensor went through, if any."""


@dataclass
class Outcome:
    """Everything an analysis produced."""

    tensors: list[Collected]
    loss: float
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    """forward_ms, backward_ms and collect_ms: the engine's own work."""
    part_losses: list[float] = field(default_factory=list)
    """Each part's loss, for merged requests."""
    batch_size: int = 1
    """How many requests shared the pass."""
    precision: str = "full"


@dataclass(frozen=True)
class _Plan:
    """What a request's targets, objective site and flags resolve to on a model: the same for
    every request that names them, so it is worked out (and checked) once."""

    captures: tuple[str, ...]
    target_nodes: tuple[str, ...]
    param_positions: tuple[int, ...]
    through_weights: bool
    site_node: str | None
    """The node the objective is taken at; None for a model output (or no objective)."""
    grad_nodes: tuple[str, ...]
    run: Callable[..., Any]
    """The graph variant returning (user outputs..., captured nodes...)."""
    state: tuple[torch.Tensor, ...] | None
    """The graph's state inputs as they are, when none of them needs a gradient."""


class Engine:
    """Runs analyses on prepared models; safe to call from many threads at once.

    With a `compute` of its own threads (engine/compute.py), every analysis runs on one of
    them; by default, on the caller's thread.
    """

    def __init__(self, device: torch.device, compute: Compute | None = None) -> None:
        self.device = device
        self.compute = compute if compute is not None else Compute(0)
        self._device_name = str(device)
        self._cuda = device.type == "cuda"
        self._lock = threading.Lock()
        self._variants = graph.Variants()
        self._plans: dict[int, dict[tuple[Any, ...], _Plan]] = {}
        """Model.key -> request shape -> plan."""

    def analyze(self, model: Model, request: Analysis, should_stop: ShouldStop = never) -> Outcome:
        """Runs one forward and backward pass; raises RequestError subclasses on bad requests.

        The inputs must fit the model (see the module docstring).
        """
        return self.compute.run(self._analyze_mapped, model, request, should_stop)

    def _analyze_mapped(self, model: Model, request: Analysis, should_stop: ShouldStop) -> Outcome:
        try:
            return self._analyze(model, request, should_stop)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise ResourceExhausted(
                "the device ran out of memory for this request; send a smaller batch",
                reason="DEVICE_OUT_OF_MEMORY",
            ) from None

    def _analyze(self, model: Model, request: Analysis, should_stop: ShouldStop) -> Outcome:
        plan = self._planned(model, request)
        param_positions = plan.param_positions
        objective = request.objective
        if objective is not None:
            _check_objective(model, request.inputs, objective, plan.site_node)
        if should_stop():
            raise Cancelled("the call was cancelled", reason="CANCELLED")
        timings: dict[str, float] = {}

        grad_mode = torch.enable_grad() if objective is not None else torch.no_grad()
        with grad_mode:
            inputs = [t.to(self.device) for t in request.inputs]
            if objective is not None:
                for t in inputs:
                    if t.is_floating_point():
                        t.requires_grad_(True)
            # Gradients reach a node only if something upstream requires them. Inputs do for
            # most models; where a node hangs off weights alone (an embedding of token ids),
            # the weights must, too. autograd.grad still computes no weight gradient.
            state = plan.state
            if state is None:
                through_weights = objective is not None and plan.through_weights
                state = tuple(
                    v.detach().requires_grad_(True)
                    if v.is_floating_point() and (through_weights or p in param_positions)
                    else v
                    for p, (_, v, _) in enumerate(model.state)
                )
            t0 = time.perf_counter()
            autocast = (
                torch.autocast(self.device.type, torch.bfloat16) if request.autocast else None
            )
            try:
                graph.watch(should_stop)
                corrupt = self._corrupt(model, request, plan, state, autocast)
                if autocast is None:
                    flat = plan.run(*state, *inputs)
                else:
                    with autocast:
                        flat = plan.run(*state, *inputs)
            except (RuntimeError, IndexError, ValueError) as e:
                if isinstance(e, torch.OutOfMemoryError):
                    raise
                # Inputs of the right dtype and shape can still hold values the model cannot
                # take (token ids past the vocabulary). torch's message may carry source
                # paths, so only the exception type is passed on.
                raise InvalidArgument(
                    f"the model could not run on these inputs ({type(e).__name__}); check "
                    "their values, e.g. token ids within the vocabulary",
                    reason="MODEL_REJECTED_INPUT",
                    field="inputs",
                ) from e
            finally:
                graph.watch(None)
            n_out = len(model.output_positions)
            outputs = flat[:n_out]
            captured = dict(zip(plan.captures, flat[n_out:]))
            self._sync()
            timings["forward_ms"] = (time.perf_counter() - t0) * 1e3
            if should_stop():
                raise Cancelled("the call was cancelled", reason="CANCELLED")

            loss_value = float("nan")
            part_losses: list[float] = []
            gradients: dict[str, torch.Tensor] = {}
            input_grads: dict[int, torch.Tensor] = {}
            param_grads: dict[int, torch.Tensor] = {}
            t0 = time.perf_counter()
            if objective is not None:
                site = captured[plan.site_node] if plan.site_node else outputs[objective.output]
                if objective.parts:
                    losses = [loss(part, site[a:b]) for a, b, part in objective.parts]
                    part_losses = [x.item() for x in losses]
                    scalar = torch.stack(losses).sum()
                else:
                    scalar = loss(objective, site)
                loss_value = scalar.item()
                grad_nodes = plan.grad_nodes
                grad_inputs = [
                    i
                    for i, t in enumerate(inputs)
                    if request.input_gradients and t.is_floating_point()
                ]
                wrt = [captured[n] for n in grad_nodes] + [inputs[i] for i in grad_inputs]
                wrt += [state[p] for p in param_positions]
                grads = _grad(scalar, wrt)
                gradients = dict(zip(grad_nodes, grads[: len(grad_nodes)]))
                input_grads = dict(zip(grad_inputs, grads[len(grad_nodes) :]))
                param_grads = dict(zip(param_positions, grads[len(wrt) - len(param_positions) :]))
            self._sync()
            timings["backward_ms"] = (time.perf_counter() - t0) * 1e3
            if should_stop():
                raise Cancelled("the call was cancelled", reason="CANCELLED")

        t0 = time.perf_counter()
        tensors: list[Collected] = []
        for i, (target, node) in enumerate(zip(request.targets, plan.target_nodes)):
            if target.patching:
                patched = (corrupt[node] - captured[node].detach()) * gradients[node]
                r = _reduce.apply(target.reduction, None, patched, f"targets[{i}]")
                assert r.gradient is not None
                role = Role.ATTRIBUTION_PATCHING
                tensors.append(Collected(role, target.name, 0, _detached(r.gradient), r.applied))
                continue
            if target.reduction is None:
                if target.activation:
                    tensors.append(
                        Collected(Role.ACTIVATION, target.name, 0, _detached(captured[node]))
                    )
                if target.gradient:
                    tensors.append(
                        Collected(Role.GRADIENT, target.name, 0, _detached(gradients[node]))
                    )
                continue
            product = target.reduction.reduce is _reduce.Reduce.GRADIENT_X_ACTIVATION
            r = _reduce.apply(
                target.reduction,
                captured[node] if target.activation or product else None,
                gradients[node] if target.gradient else None,
                f"targets[{i}]",
            )
            if r.activation is not None:
                tensors.append(
                    Collected(Role.ACTIVATION, target.name, 0, _detached(r.activation), r.applied)
                )
            if r.gradient is not None:
                tensors.append(
                    Collected(Role.GRADIENT, target.name, 0, _detached(r.gradient), r.applied)
                )
            if r.indices is not None:
                tensors.append(
                    Collected(Role.TOPK_INDICES, target.name, 0, _detached(r.indices), r.applied)
                )
        for p, g in param_grads.items():
            tensors.append(Collected(Role.PARAMETER_GRADIENT, model.state[p][0], 0, _detached(g)))
        for i, g in input_grads.items():
            tensors.append(Collected(Role.INPUT_GRADIENT, "", i, _detached(g)))
        if request.outputs:
            for i, out in enumerate(outputs):
                tensors.append(Collected(Role.OUTPUT, "", i, _detached(out)))
        timings["collect_ms"] = (time.perf_counter() - t0) * 1e3
        return Outcome(
            tensors=tensors,
            loss=loss_value,
            device=self._device_name,
            timings=timings,
            part_losses=part_losses,
            precision="bfloat16-autocast" if request.autocast else "full",
        )

    # -- the plan ---------------------------------------------------------------------------

    def _planned(self, model: Model, request: Analysis) -> _Plan:
        """The request's plan: checked and resolved once per model and request shape, then
        looked up. Only plans that passed every check are kept, so a refused request is
        checked, and refused, on every call."""
        objective = request.objective
        key: tuple[Any, ...] | None = (
            tuple(request.targets),
            None if objective is None else (objective.node, objective.output),
            tuple(request.param_grads),
            request.input_gradients,
        )
        plans = self._plans.get(model.key)
        try:
            plan = plans.get(key) if plans is not None and key is not None else None
        except TypeError:  # an unhashable target (a reduction's dims in a list): plan anew
            key, plan = None, None
        if plan is not None:
            return plan
        target_nodes = _target_nodes(model, request.targets)
        site_node = _site_node(model, objective)
        param_positions = tuple(model.param_positions(request.param_grads))
        wants_grad = request.input_gradients or any(
            t.gradient or t.patching for t in request.targets
        )
        if (wants_grad or param_positions) and objective is None:
            raise InvalidArgument(
                "gradients need an objective (sum, logit, cross_entropy, mse or grad_outputs)",
                reason="OBJECTIVE_REQUIRED",
                field="objective",
            )
        grad_nodes = tuple(
            dict.fromkeys(
                node for t, node in zip(request.targets, target_nodes) if t.gradient or t.patching
            )
        )
        # The nodes that must carry gradients: gradient targets and the objective's site.
        grad_sites = list(grad_nodes)
        if objective is not None:
            grad_sites.append(site_node or model.output_nodes[objective.output])
        through_weights = any(node not in model.input_dependent for node in grad_sites)
        captures = tuple(dict.fromkeys([*target_nodes, *([site_node] if site_node else [])]))
        module = self._variants.get(model, captures)
        # Calling the generated forward directly skips nn.Module's hook dispatch and torch.fx's
        # error-printing wrapper: the same operators, a few microseconds less per call.
        run = module.forward if isinstance(module, torch.fx.GraphModule) else module
        needs_state_grad = bool(param_positions) or (objective is not None and through_weights)
        plan = _Plan(
            captures=captures,
            target_nodes=tuple(target_nodes),
            param_positions=param_positions,
            through_weights=through_weights,
            site_node=site_node,
            grad_nodes=grad_nodes,
            run=run,
            state=None if needs_state_grad else tuple(v for _, v, _ in model.state),
        )
        if key is not None:
            with self._lock:
                plans = self._plans.setdefault(model.key, {})
                if len(plans) < PLANS_PER_MODEL:
                    plans.setdefault(key, plan)
        return plan

    def forget(self, model: Model) -> None:
        """Drops what the engine keeps for `model` (plans, graph variants): call it once no
        call runs on the model any more, or it would be kept again."""
        with self._lock:
            self._plans.pop(model.key, None)
        self._variants.forget(model)

    def _corrupt(
        self,
        model: Model,
        request: Analysis,
        plan: _Plan,
        state: tuple[torch.Tensor, ...],
        autocast: Any,
    ) -> dict[str, torch.Tensor]:
        """Attribution patching's second forward pass, on the corrupted inputs and without
        gradients: the patched targets' activations there, by node."""
        if not request.corrupt_inputs:
            return {}
        patched = {n for t, n in zip(request.targets, plan.target_nodes) if t.patching}
        with torch.no_grad():
            inputs = [t.to(self.device) for t in request.corrupt_inputs]
            if autocast is None:
                flat = plan.run(*state, *inputs)
            else:
                with autocast:
                    flat = plan.run(*state, *inputs)
        n_out = len(model.output_positions)
        return {n: v for n, v in zip(plan.captures, flat[n_out:]) if n in patched}

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)


def _target_nodes(model: Model, targets: Sequence[Target]) -> list[str]:
    """Each target's node, every target checked: it resolves, is not repeated, has a gradient
    if one is asked for, and its reduction fits the node."""
    seen: set[tuple[str, bool, bool, bool]] = set()
    nodes = []
    for i, target in enumerate(targets):
        node = model.resolve(target.name)
        if node is None:
            raise InvalidArgument(
                f"unknown target {_clip(target.name)!r}: not a graph node or module path of "
                f"{model.name} (DescribeModel lists them)",
                reason="UNKNOWN_TARGET",
                field=f"targets[{i}].name",
            )
        key = (target.name, target.activation, target.gradient, target.patching)
        if key in seen or (target.name, True, True, False) in seen:
            raise InvalidArgument(
                f"target {_clip(target.name)!r} is requested twice",
                reason="DUPLICATE_TARGET",
                field=f"targets[{i}].name",
            )
        seen.add(key)
        if (target.gradient or target.patching) and not model.nodes[node].differentiable:
            raise InvalidArgument(
                f"target {_clip(target.name)!r} has dtype "
                f"{dtype_name(model.nodes[node].spec.dtype)}: it has an activation "
                "but no gradient",
                reason="NOT_DIFFERENTIABLE",
                field=f"targets[{i}].capture",
            )
        if target.reduction is not None:
            _reduce.check(target.reduction, model.nodes[node].spec, f"targets[{i}]")
            if target.reduction.reduce is _reduce.Reduce.GRADIENT_X_ACTIVATION and (
                target.activation or target.patching or not target.gradient
            ):
                raise InvalidArgument(
                    f"targets[{i}]: reduce gradient_x_activation sends one tensor, the "
                    "gradient times the activation, as the gradient: capture the gradient "
                    "alone (the activation, if wanted, as a second target)",
                    reason="BAD_REDUCTION",
                    field=f"targets[{i}].capture",
                )
        nodes.append(node)
    return nodes


def _site_node(model: Model, objective: Objective | None) -> str | None:
    """The node the objective is taken at, resolved once; None for a model output (checked to
    exist) or no objective."""
    if objective is None:
        return None
    if not objective.node:
        if objective.output >= len(model.outputs):
            raise InvalidArgument(
                f"output {objective.output} does not exist: {model.name} has "
                f"{len(model.outputs)} output(s)",
                reason="UNKNOWN_OUTPUT",
                field=f"{objective.field}.site.output",
            )
        return None
    node = model.resolve(objective.node)
    if node is None:
        raise InvalidArgument(
            f"unknown objective node {_clip(objective.node)!r}",
            reason="UNKNOWN_TARGET",
            field=f"{objective.field}.site.node",
        )
    return node


def _check_objective(
    model: Model, inputs: Sequence[torch.Tensor], objective: Objective, site_node: str | None
) -> None:
    """Checks the objective (each merged part on its rows) against the site's shape, from the
    graph's symbolic shapes: every misfit is refused before the forward pass."""
    spec = model.nodes[site_node].spec if site_node else model.outputs[objective.output]
    shape = shape_of(spec, bindings(model, inputs))
    if not objective.parts:
        check(objective, shape, spec.dtype)
    for start, end, part in objective.parts:
        check(part, (end - start, *shape[1:]), spec.dtype)


def _grad(scalar: torch.Tensor, wrt: list[torch.Tensor]) -> list[torch.Tensor]:
    """d scalar / d t for each t; zeros where the scalar does not depend on t."""
    needs = [i for i, t in enumerate(wrt) if t.requires_grad]
    grads: list[torch.Tensor | None] = [None] * len(wrt)
    if needs and scalar.requires_grad:
        computed = torch.autograd.grad(scalar, [wrt[i] for i in needs], allow_unused=True)
        for i, g in zip(needs, computed):
            grads[i] = g
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, wrt)]


def _detached(t: torch.Tensor) -> torch.Tensor:
    """A result tensor, left on its device: wire/frames.py copies it to the host, overlapping
    each device-to-host copy with the streaming of the tensor before it."""
    return t.detach().contiguous()


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
