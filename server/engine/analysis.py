"""Pure torch: resolve targets, run the forward and backward passes, collect the tensors.

The engine knows nothing of gRPC. It runs an exported program's flat graph, rewritten so
that every requested node is also a graph output; `torch.autograd.grad` on those outputs
gives exactly what `retain_grad()` would, without hooks and without parameter gradients
that nobody asked for.

Precondition: a request's inputs fit its model (`Model.check_inputs`). Every request the wire
decodes was checked there, before anything was allocated; in-process callers (batching,
adversarial loops, attribution) build only inputs that fit. The engine does not check again.
"""

from __future__ import annotations

import enum
import functools
import linecache
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import Cancelled, InvalidArgument, ResourceExhausted
from ..models.model import Model, dtype_name
from . import reduce as _reduce

_VARIANTS_PER_MODEL = 32
"""Compiled graph variants kept per model (one per distinct set of captured nodes)."""

_PLANS_PER_MODEL = 256
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


@dataclass(frozen=True)
class Target:
    """A node to capture, named as the caller named it (graph node or module path)."""

    name: str
    activation: bool = False
    gradient: bool = True
    reduction: _reduce.Reduction | None = None
    """Reduced on the device before the host copy (engine/reduce.py); None sends it whole."""


@dataclass(frozen=True)
class Objective:
    """The scalar to differentiate, taken at a model output or at a node.

    `kind` is one of "sum", "logit", "cross_entropy", "mse", "grad_outputs". `field` is the
    request field that holds it, used to name the culprit in errors.
    """

    kind: str
    output: int = 0
    node: str = ""
    index: tuple[int, ...] = ()
    tensor: torch.Tensor | None = None
    reduction: str = "mean"
    field: str = "objective"
    parts: tuple[tuple[int, int, Objective], ...] = ()
    """For merged requests (engine/batching.py): (first row, end row, that request's own
    objective); the scalar is the sum of each part's objective on its rows."""


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
    part_losses: list[float] = field(default_factory=list)
    """Each part's loss, for merged requests."""
    batch_size: int = 1
    """How many requests shared the pass."""
    precision: str = "full"


ShouldStop = Callable[[], bool]


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


_checkpoints = threading.local()
"""The running request's should_stop, per thread, read by _checkpoint inside the graph."""


def _checkpoint() -> None:
    should_stop = getattr(_checkpoints, "should_stop", None)
    if should_stop is not None and should_stop():
        raise Cancelled("the call was cancelled", reason="CANCELLED")


def _never() -> bool:
    return False


class Engine:
    """Runs analyses on prepared models; safe to call from many threads at once."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._device_name = str(device)
        self._cuda = device.type == "cuda"
        self._lock = threading.Lock()
        self._variants: dict[str, dict[tuple[str, ...], torch.fx.GraphModule]] = {}
        self._plans: dict[tuple[str, str], dict[tuple[Any, ...], _Plan]] = {}

    # -- graph variants ---------------------------------------------------------------------

    def _variant(self, model: Model, captures: tuple[str, ...]) -> Callable[..., Any]:
        """The model's flat graph returning (user outputs..., captured nodes...).

        The first sets of captured nodes each get a compiled graph, kept for good. Compiling
        costs native memory torch.fx never gives back, so past that number a new set runs
        through torch.fx's Interpreter instead: a little slower, with the same operators
        and numbers, and nothing left behind.
        """
        with self._lock:
            cache = self._variants.setdefault(model.name, {})
            module = cache.get(captures)
            if module is not None:
                return module
            if len(cache) >= _VARIANTS_PER_MODEL:
                return functools.partial(_interpreted, model, captures)
        source = model.program.graph
        graph = torch.fx.Graph()
        copied: dict[torch.fx.Node, torch.fx.Node] = {}
        flat_outputs = graph.graph_copy(source, copied)
        assert isinstance(flat_outputs, (tuple, list))
        by_name = {old.name: new for old, new in copied.items()}
        # Between every two operators, a check that the caller is still there: a cancelled
        # or expired call stops within one layer of the forward pass.
        for node in list(graph.nodes):
            if node.op == "call_function":
                with graph.inserting_after(node):
                    graph.call_function(_checkpoint)
        user_outputs = [flat_outputs[p] for p in model.output_positions]
        graph.output((*user_outputs, *(by_name[name] for name in captures)))
        module = torch.fx.GraphModule(model.program.graph_module, graph)
        with self._lock:
            if len(cache) < _VARIANTS_PER_MODEL:
                cache.setdefault(captures, module)
                return cache[captures]
        release(module)
        return functools.partial(_interpreted, model, captures)

    # -- the analysis -----------------------------------------------------------------------

    def analyze(self, model: Model, request: Analysis, should_stop: ShouldStop = _never) -> Outcome:
        """Runs one forward and backward pass; raises RequestError subclasses on bad requests.

        The inputs must fit the model (see the module docstring).
        """
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
        started = time.perf_counter()
        plan = self._planned(model, request)
        captures, target_nodes = plan.captures, plan.target_nodes
        param_positions = plan.param_positions
        objective = request.objective
        if should_stop():
            raise Cancelled("the call was cancelled", reason="CANCELLED")
        timings: dict[str, float] = {"decode_ms": 0.0}

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
                _checkpoints.should_stop = should_stop
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
                _checkpoints.should_stop = None
            n_out = len(model.output_positions)
            outputs = flat[:n_out]
            captured = dict(zip(captures, flat[n_out:]))
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
                    losses = [_loss(part, site[a:b]) for a, b, part in objective.parts]
                    part_losses = [x.item() for x in losses]
                    loss = torch.stack(losses).sum()
                else:
                    loss = _loss(objective, site)
                loss_value = loss.item()
                grad_nodes = plan.grad_nodes
                grad_inputs = [
                    i
                    for i, t in enumerate(inputs)
                    if request.input_gradients and t.is_floating_point()
                ]
                wrt = [captured[n] for n in grad_nodes] + [inputs[i] for i in grad_inputs]
                wrt += [state[p] for p in param_positions]
                grads = _grad(loss, wrt)
                gradients = dict(zip(grad_nodes, grads[: len(grad_nodes)]))
                input_grads = dict(zip(grad_inputs, grads[len(grad_nodes) :]))
                param_grads = dict(zip(param_positions, grads[len(wrt) - len(param_positions) :]))
            self._sync()
            timings["backward_ms"] = (time.perf_counter() - t0) * 1e3
            if should_stop():
                raise Cancelled("the call was cancelled", reason="CANCELLED")

        t0 = time.perf_counter()
        tensors: list[Collected] = []
        for i, (target, node) in enumerate(zip(request.targets, target_nodes)):
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
            r = _reduce.apply(
                target.reduction,
                captured[node] if target.activation else None,
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
        timings["total_ms"] = (time.perf_counter() - started) * 1e3
        return Outcome(
            tensors=tensors,
            loss=loss_value,
            device=self._device_name,
            timings=timings,
            part_losses=part_losses,
            precision="bfloat16-autocast" if request.autocast else "full",
        )

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
        plans = self._plans.get((model.name, model.digest))
        try:
            plan = plans.get(key) if plans is not None and key is not None else None
        except TypeError:  # an unhashable target (a reduction's dims in a list): plan anew
            key, plan = None, None
        if plan is not None:
            return plan
        captures, target_nodes = self._plan(model, request)
        param_positions = tuple(model.param_positions(request.param_grads))
        wants_grad = request.input_gradients or any(t.gradient for t in request.targets)
        if (wants_grad or param_positions) and objective is None:
            raise InvalidArgument(
                "gradients need an objective (sum, logit, cross_entropy, mse or grad_outputs)",
                reason="OBJECTIVE_REQUIRED",
                field="objective",
            )
        through_weights = any(
            node not in model.input_dependent
            for node in self._grad_sites(model, request, target_nodes)
        )
        site_node = model.resolve(objective.node) if objective and objective.node else None
        grad_nodes = tuple(
            dict.fromkeys(node for t, node in zip(request.targets, target_nodes) if t.gradient)
        )
        module = self._variant(model, captures)
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
                plans = self._plans.setdefault((model.name, model.digest), {})
                if len(plans) < _PLANS_PER_MODEL:
                    plans.setdefault(key, plan)
        return plan

    def _plan(self, model: Model, request: Analysis) -> tuple[tuple[str, ...], list[str]]:
        """Resolves targets to nodes; returns the nodes to capture and each target's node."""
        seen: set[tuple[str, bool, bool]] = set()
        target_nodes = []
        for i, target in enumerate(request.targets):
            node = model.resolve(target.name)
            if node is None:
                raise InvalidArgument(
                    f"unknown target {_clip(target.name)!r}: not a graph node or module path of "
                    f"{model.name} (DescribeModel lists them)",
                    reason="UNKNOWN_TARGET",
                    field=f"targets[{i}].name",
                )
            key = (target.name, target.activation, target.gradient)
            if key in seen or (target.name, True, True) in seen:
                raise InvalidArgument(
                    f"target {_clip(target.name)!r} is requested twice",
                    reason="DUPLICATE_TARGET",
                    field=f"targets[{i}].name",
                )
            seen.add(key)
            if target.gradient and not model.nodes[node].differentiable:
                raise InvalidArgument(
                    f"target {_clip(target.name)!r} has dtype "
                    f"{dtype_name(model.nodes[node].spec.dtype)}: it has an activation "
                    "but no gradient",
                    reason="NOT_DIFFERENTIABLE",
                    field=f"targets[{i}].capture",
                )
            if target.reduction is not None:
                _reduce.check(target.reduction, model.nodes[node].spec, f"targets[{i}]")
            target_nodes.append(node)
        captures = list(dict.fromkeys(target_nodes))
        objective = request.objective
        if objective is not None:
            if objective.node:
                node = model.resolve(objective.node)
                if node is None:
                    raise InvalidArgument(
                        f"unknown objective node {_clip(objective.node)!r}",
                        reason="UNKNOWN_TARGET",
                        field=f"{objective.field}.site.node",
                    )
                if node not in captures:
                    captures.append(node)
            elif objective.output >= len(model.outputs):
                raise InvalidArgument(
                    f"output {objective.output} does not exist: {model.name} has "
                    f"{len(model.outputs)} output(s)",
                    reason="UNKNOWN_OUTPUT",
                    field=f"{objective.field}.site.output",
                )
        return tuple(captures), target_nodes

    def _grad_sites(self, model: Model, request: Analysis, target_nodes: list[str]) -> list[str]:
        """The nodes that must carry gradients: gradient targets and the objective's site."""
        sites = [node for t, node in zip(request.targets, target_nodes) if t.gradient]
        objective = request.objective
        if objective is not None:
            if objective.node:
                node = model.resolve(objective.node)
                sites.append(node or "")
            else:
                sites.append(model.output_nodes[objective.output])
        return sites

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)


def _grad(loss: torch.Tensor, wrt: list[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d t for each t; zeros where the loss does not depend on t."""
    needs = [i for i, t in enumerate(wrt) if t.requires_grad]
    grads: list[torch.Tensor | None] = [None] * len(wrt)
    if needs and loss.requires_grad:
        computed = torch.autograd.grad(loss, [wrt[i] for i in needs], allow_unused=True)
        for i, g in zip(needs, computed):
            grads[i] = g
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, wrt)]


def _loss(objective: Objective, site: torch.Tensor) -> torch.Tensor:
    """The objective's scalar at `site`, checking that the objective fits the site."""
    f = objective.field
    if not site.is_floating_point():
        raise InvalidArgument(
            f"the objective's site has dtype {dtype_name(site.dtype)}; it needs floating point",
            reason="NOT_DIFFERENTIABLE",
            field=f"{f}.site",
        )
    kind = objective.kind
    if kind == "sum":
        return site.sum()
    if kind == "logit":
        return _logit(objective, site)
    if kind == "cross_entropy":
        labels = _required(objective, "labels")
        expected = (site.shape[0], *site.shape[2:]) if site.dim() >= 2 else ()
        if site.dim() < 2 or tuple(labels.shape) != expected:
            raise InvalidArgument(
                f"labels have shape {list(labels.shape)}; logits of shape {list(site.shape)} "
                f"need labels of shape {list(expected)}",
                reason="WRONG_SHAPE",
                field=f"{f}.labels",
            )
        if labels.dtype != torch.int64:
            raise InvalidArgument(
                "labels must be int64 class indices", reason="WRONG_DTYPE", field=f"{f}.labels"
            )
        classes = site.shape[1]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise InvalidArgument(
                f"labels must lie in [0, {classes})", reason="OUT_OF_RANGE", field=f"{f}.labels"
            )
        return F.cross_entropy(site, labels.to(site.device), reduction=objective.reduction)
    if kind in ("mse", "grad_outputs"):
        name = "expected" if kind == "mse" else "grad_output"
        other = _required(objective, name)
        if tuple(other.shape) != tuple(site.shape):
            raise InvalidArgument(
                f"{name} has shape {list(other.shape)}; the site has shape {list(site.shape)}",
                reason="WRONG_SHAPE",
                field=f"{f}.{name}",
            )
        if not other.is_floating_point():
            raise InvalidArgument(
                f"{name} must be floating point", reason="WRONG_DTYPE", field=f"{f}.{name}"
            )
        other = other.to(device=site.device, dtype=site.dtype)
        if kind == "mse":
            return F.mse_loss(site, other, reduction=objective.reduction)
        return (site * other).sum()
    raise InvalidArgument(f"unknown objective {kind!r}", reason="BAD_OBJECTIVE", field=f)


def _logit(objective: Objective, site: torch.Tensor) -> torch.Tensor:
    f = objective.field
    index = list(objective.index)
    if not index:
        raise InvalidArgument("logit needs an index", reason="BAD_OBJECTIVE", field=f"{f}.index")
    if site.dim() == 0:
        raise InvalidArgument(
            "logit needs a site with at least one dimension", reason="BAD_OBJECTIVE", field=f"{f}"
        )
    rows = site.reshape(site.shape[0], -1) if site.dim() >= 2 else site.reshape(1, -1)
    width = rows.shape[1]
    if any(i < 0 or i >= width for i in index):
        raise InvalidArgument(
            f"logit index must lie in [0, {width})", reason="OUT_OF_RANGE", field=f"{f}.index"
        )
    if len(index) == 1:
        return rows[:, index[0]].sum()
    if site.dim() >= 2 and len(index) == rows.shape[0]:
        picked = torch.tensor(index, device=site.device)
        return rows[torch.arange(rows.shape[0], device=site.device), picked].sum()
    raise InvalidArgument(
        f"logit index has {len(index)} values: give one, or one per row ({rows.shape[0]})",
        reason="BAD_OBJECTIVE",
        field=f"{f}.index",
    )


def _required(objective: Objective, name: str) -> torch.Tensor:
    if objective.tensor is None:
        raise InvalidArgument(
            f"{objective.kind} needs {name}",
            reason="BAD_OBJECTIVE",
            field=f"{objective.field}.{name}",
        )
    return objective.tensor


class _Capturing(torch.fx.Interpreter):
    """Runs a graph node by node, keeping the values of the wanted nodes."""

    def __init__(self, module: torch.fx.GraphModule, wanted: tuple[str, ...]) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.wanted = set(wanted)
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = value
        if n.op == "call_function":
            _checkpoint()
        return value


def _interpreted(model: Model, captures: tuple[str, ...], *args: torch.Tensor) -> tuple[Any, ...]:
    """What a compiled variant returns, computed by the Interpreter."""
    interpreter = _Capturing(model.program.graph_module, captures)
    flat = interpreter.run(*args)
    outputs = [flat[p] for p in model.output_positions]
    return (*outputs, *(interpreter.values[name] for name in captures))


def release(module: torch.fx.GraphModule) -> None:
    """Drops the generated source torch.fx keeps, forever, for every GraphModule it compiles
    (in its loader's eval_cache and in linecache). Call it when a module is discarded;
    without it, each rebuilt graph variant leaks its source."""
    loader = getattr(torch.fx.graph_module, "_loader", None)
    for m in module.modules():
        if not isinstance(m, torch.fx.GraphModule):
            continue
        key = type(m).forward.__code__.co_filename
        if loader is not None:
            loader.eval_cache.pop(key, None)
        linecache.cache.pop(key, None)


def _detached(t: torch.Tensor) -> torch.Tensor:
    """A result tensor, left on its device: wire/frames.py copies it to the host, overlapping
    each device-to-host copy with the streaming of the tensor before it."""
    return t.detach().contiguous()


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
