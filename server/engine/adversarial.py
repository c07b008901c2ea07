"""Adversarial loops on the server: FGSM and PGD with Captum's semantics, any objective.

Each step is one engine analysis: a forward and backward pass giving the objective and its
gradient with respect to the input. So the objective can be anything Analyze accepts,
including a loss at an intermediate node, which Captum's FGSM and PGD (a loss on the
model's output) cannot express. The step itself is Captum's: move each element by the sign
of its gradient where the gradient exceeds FGSM.zero_thresh, project onto the epsilon ball
around the input (PGD), clamp to the bounds. The loop yields after every step so that the
caller can stream progress, and stops between steps when the call is cancelled.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import Cancelled, InvalidArgument
from ..models.model import Model
from .analysis import Analysis, Engine, Role
from .graph import ShouldStop, never
from .objectives import Objective

MAX_STEPS = 1000
"""Most PGD steps one call may ask for."""

ZERO_THRESHOLD = 1e-6
"""Captum's FGSM.zero_thresh: gradient elements at or below it do not move."""

METHODS = ("fgsm", "pgd")
"""The loops, by Captum's names."""

NORMS = ("Linf", "L2")
"""PGD's norms, by Captum's names; the first is its default."""


@dataclass(frozen=True)
class Perturbation:
    """One adversarial loop, as the caller asked for it (Captum's names where it has them)."""

    inputs: Sequence[torch.Tensor]
    objective: Objective
    method: str
    epsilon: float
    step_size: float = 0.0
    steps: int = 0
    norm: str = NORMS[0]
    targeted: bool = False
    lower_bound: float = -math.inf
    upper_bound: float = math.inf
    random_start: bool = False
    seed: int | None = None
    mask: torch.Tensor | None = None
    zero_threshold: float = ZERO_THRESHOLD


@dataclass(frozen=True)
class Step:
    """One step done: the objective at the point the step started from."""

    step: int
    loss: float


@dataclass
class Perturbed:
    """The loop's result: the perturbed input on the host and the objective along the way."""

    adversarial: torch.Tensor
    index: int
    """The perturbed input's position."""
    losses: list[float]
    objective_before: float
    objective_after: float
    device: str
    seed: int = 0


def perturb(
    engine: Engine,
    model: Model,
    request: Perturbation,
    should_stop: ShouldStop = never,
) -> Iterator[Step | Perturbed]:
    """Yields a Step after each step, then the Perturbed result.

    The inputs must fit the model (Model.check_inputs; the wire checks them), and every step
    keeps their dtype and shape. Every other check of the request happens before the first
    step; the objective is checked by the first step's analysis, before anything is yielded.
    """
    index = _check(model, request)
    objective = request.objective
    device = engine.device
    inputs = [t.to(device) for t in request.inputs]
    x0 = inputs[index]
    mask = request.mask.to(device=device, dtype=x0.dtype) if request.mask is not None else 1
    pgd = request.method == "pgd"
    steps = request.steps if pgd else 1
    step_size = request.step_size if pgd else request.epsilon
    multiplier = -1 if request.targeted else 1
    seed = 0

    def bound(t: torch.Tensor) -> torch.Tensor:
        return torch.clamp(t, min=request.lower_bound, max=request.upper_bound)

    def evaluate(x: torch.Tensor, gradient: bool) -> tuple[float, torch.Tensor | None]:
        at = list(inputs)
        at[index] = x.detach()  # the engine marks its input as requiring gradients
        outcome = engine.analyze(
            model,
            Analysis(inputs=at, objective=objective, input_gradients=gradient),
            should_stop,
        )
        if not gradient:
            return outcome.loss, None
        grad = next(
            c.tensor for c in outcome.tensors if c.role == Role.INPUT_GRADIENT and c.index == index
        )
        return outcome.loss, grad.to(device)

    x = x0
    if pgd and request.random_start:
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        x = bound(_random_point(x0, request.epsilon, request.norm, mask, seed))
    losses: list[float] = []
    for i in range(steps):
        if should_stop():
            raise Cancelled("the call was cancelled", reason="CANCELLED")
        loss, grad = evaluate(x, gradient=True)
        assert grad is not None
        losses.append(loss)
        yield Step(i, loss)
        # captum.robust.FGSM._perturb, then PGD's projection and bounds.
        x = torch.where(
            torch.abs(grad) > request.zero_threshold,
            x + multiplier * step_size * torch.sign(grad) * mask,
            x,
        )
        if pgd:
            diff = x - x0
            if request.norm == "Linf":
                x = x0 + torch.clamp(diff, -request.epsilon, request.epsilon)
            else:
                x = x0 + torch.renorm(diff, 2, 0, request.epsilon)
        x = bound(x).detach()
    before = evaluate(x0, gradient=False)[0] if request.random_start and pgd else losses[0]
    after, _ = evaluate(x, gradient=False)
    yield Perturbed(
        adversarial=x.detach().to("cpu").contiguous(),
        index=index,
        losses=losses,
        objective_before=before,
        objective_after=after,
        device=str(device),
        seed=seed,
    )


def _check(model: Model, request: Perturbation) -> int:
    """The perturbed input's position; every parameter checked."""
    if request.method not in METHODS:
        raise InvalidArgument(
            f"unknown perturbation method {request.method[:40]!r}; use fgsm or pgd",
            reason="UNKNOWN_METHOD",
            field="method",
        )
    floating = [i for i, t in enumerate(request.inputs) if t.is_floating_point()]
    if len(floating) != 1:
        raise InvalidArgument(
            f"perturb moves the model's one floating-point input, and {model.name} has "
            f"{len(floating)}",
            reason="NEEDS_ONE_FLOAT_INPUT",
            field="inputs",
        )
    index = floating[0]
    pgd = request.method == "pgd"

    def finite(name: str, value: float) -> None:
        if not (math.isfinite(value) and value >= 0):
            raise InvalidArgument(
                f"{name} is {value}; it must be a finite number >= 0",
                reason="OUT_OF_RANGE",
                field=name,
            )

    finite("epsilon", request.epsilon)
    finite("step_size", request.step_size)
    finite("zero_threshold", request.zero_threshold)
    if pgd and not 1 <= request.steps <= MAX_STEPS:
        raise InvalidArgument(
            f"steps is {request.steps}; pgd takes 1 to {MAX_STEPS} steps",
            reason="OUT_OF_RANGE",
            field="steps",
        )
    if not pgd:
        for name, unset in (
            ("steps", request.steps in (0, 1)),
            ("step_size", request.step_size == 0),
            ("norm", request.norm == "Linf"),
            ("random_start", not request.random_start),
        ):
            if not unset:
                raise InvalidArgument(
                    f"{name} applies to pgd; fgsm takes one step of size epsilon",
                    reason="BAD_PARAMETER",
                    field=name,
                )
    if request.norm not in NORMS:
        raise InvalidArgument(
            f"unknown norm {request.norm[:20]!r}; use Linf or L2",
            reason="BAD_PARAMETER",
            field="norm",
        )
    if request.seed is not None and not request.random_start:
        raise InvalidArgument(
            "seed seeds the random start; set random_start too",
            reason="BAD_PARAMETER",
            field="seed",
        )
    if math.isnan(request.lower_bound) or math.isnan(request.upper_bound):
        raise InvalidArgument(
            "the bounds must be numbers", reason="OUT_OF_RANGE", field="lower_bound"
        )
    if request.lower_bound > request.upper_bound:
        raise InvalidArgument(
            f"lower_bound {request.lower_bound} is above upper_bound {request.upper_bound}",
            reason="OUT_OF_RANGE",
            field="lower_bound",
        )
    if request.mask is not None:
        shape = tuple(request.inputs[index].shape)
        if tuple(request.mask.shape) != shape:
            raise InvalidArgument(
                f"mask has shape {list(request.mask.shape)}; the input has {list(shape)}",
                reason="WRONG_SHAPE",
                field="mask.shape",
            )
    return index


def _random_point(
    center: torch.Tensor, radius: float, norm: str, mask: torch.Tensor | int, seed: int
) -> torch.Tensor:
    """captum.robust.PGD._random_point, drawing from a private CPU generator.

    On the CPU it draws what torch.manual_seed(seed) followed by Captum would. Captum's L2
    radius broadcasts along the last dimension, which is only right for a batch of one;
    here each row gets its own radius.
    """
    generator = torch.Generator().manual_seed(seed)
    if norm == "L2":
        u = torch.randn(center.shape, generator=generator, dtype=center.dtype)
        unit_u = F.normalize(u.view(u.size(0), -1)).view(u.size())
        d = torch.numel(center[0])
        r = (torch.rand(u.size(0), generator=generator) ** (1.0 / d)) * radius
        r = r.view(-1, *(1,) * (u.dim() - 1))
        return center + (r * unit_u).to(center.device, center.dtype) * mask
    x = torch.rand(center.shape, generator=generator, dtype=center.dtype) * radius * 2 - radius
    return center + x.to(center.device) * mask
