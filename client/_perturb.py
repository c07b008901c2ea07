"""Perturb calls: encoding an adversarial loop, following its progress, the result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradtap.v1 import gradtap_pb2 as pb

from ._frames import Frames, broken
from ._objective import Objective
from ._request import model_ref
from ._tensor import encode

METHODS: dict[str, pb.PerturbMethod.ValueType] = {
    "fgsm": pb.PERTURB_METHOD_FGSM,
    "pgd": pb.PERTURB_METHOD_PGD,
}
NORMS: dict[str, pb.PerturbNorm.ValueType] = {
    "Linf": pb.PERTURB_NORM_LINF,
    "L2": pb.PERTURB_NORM_L2,
}

OnStep = Callable[[int, float], Any]
"""Called with (step, loss) as each step's progress arrives."""


@dataclass
class PerturbResult:
    """What an adversarial loop returned.

    Attributes:
        adversarial: the perturbed input, shaped like the input.
        losses: the objective at the start of each step, in order.
        objective_before: the objective at the unperturbed input.
        objective_after: the objective at the perturbed input.
        metadata: model, model_digest, device, torch_version, replica, seed (of the random
            start; 0 without one) and total_ms.
    """

    adversarial: np.ndarray
    losses: list[float]
    objective_before: float
    objective_after: float
    metadata: dict[str, Any] = field(default_factory=dict)


def perturb_request(
    model: str,
    inputs: Any,
    method: str,
    objective: Objective | None,
    *,
    epsilon: float,
    step_size: float | None,
    steps: int | None,
    norm: str,
    targeted: bool,
    clamp: tuple[float | None, float | None] | None,
    random_start: bool,
    seed: int | None,
    mask: Any,
    zero_threshold: float | None,
    digest: str | None,
) -> pb.PerturbRequest:
    """Encodes a perturb call; the server checks the values against the method."""
    if method not in METHODS:
        raise ValueError(f"method must be 'fgsm' or 'pgd', not {method!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be 'Linf' or 'L2', not {norm!r}")
    if not isinstance(objective, Objective):
        raise TypeError("perturb needs an objective, built with gradtap.client.Objective")
    arrays = [np.asarray(a) for a in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
    request = pb.PerturbRequest(
        model=model_ref(model, digest),
        inputs=[encode(a) for a in arrays],
        method=METHODS[method],
        epsilon=float(epsilon),
        step_size=float(step_size or 0.0),
        steps=int(steps or 0),
        norm=NORMS[norm],
        targeted=bool(targeted),
        random_start=bool(random_start),
    )
    request.objective.CopyFrom(objective.message)
    if clamp is not None:
        low, high = clamp
        if low is not None:
            request.lower_bound = float(low)
        if high is not None:
            request.upper_bound = float(high)
    if seed is not None:
        request.seed = int(seed)
    if mask is not None:
        floating = [a for a in arrays if np.issubdtype(a.dtype, np.floating)]
        dtype = floating[0].dtype if floating else np.float32
        request.mask.CopyFrom(encode(np.asarray(mask).astype(dtype, copy=False)))
    if zero_threshold is not None:
        request.zero_threshold = float(zero_threshold)
    return request


class PerturbAssembler:
    """Feeds Perturb stream messages in order; progress first, then the framed result."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._frames = Frames()
        self._steps: list[float] = []
        self._summary: pb.PerturbSummary | None = None

    def feed(self, message: pb.PerturbResponse) -> tuple[int, float] | None:
        """Takes one message; returns (step, loss) when it reports a step."""
        if message.HasField("progress"):
            if self._frames.headers is not None or self._summary is not None:
                raise broken("the stream sent progress after its result began")
            step = message.progress
            if step.step != len(self._steps):
                raise broken(f"progress for step {step.step} arrived out of order")
            self._steps.append(step.loss)
            return step.step, step.loss
        self._frames.feed(message.header if message.HasField("header") else None, message.chunks)
        if message.HasField("summary"):
            self._frames.finish(message.summary.tensor_count)
            self._summary = message.summary
        return None

    def result(self) -> PerturbResult:
        """The complete result; GradtapError(DATA_LOSS) if the stream was cut short."""
        s = self._summary
        if s is None:
            raise broken("the stream ended before its summary; the result is incomplete")
        if len(self._frames.arrays) != 1:
            raise broken(f"the stream sent {len(self._frames.arrays)} tensors instead of one")
        return PerturbResult(
            adversarial=self._frames.arrays[0],
            losses=list(s.losses),
            objective_before=s.objective_before,
            objective_after=s.objective_after,
            metadata={
                "model": self._model,
                "model_digest": s.model_digest,
                "device": s.device,
                "torch_version": s.torch_version,
                "replica": s.replica,
                "seed": s.seed,
                "total_ms": s.total_ms,
            },
        )
