"""A token attribution as the caller asks for it, what it returns, and the bounds and checks
every request passes before any work (engine/tokens.py computes it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidArgument
from .captum_bridge import INTEGRATION_METHODS
from .objectives import Objective

METHODS = ("saliency", "input_x_gradient", "integrated_gradients")
"""saliency: the gradient (LayerGradientXActivation, multiply_by_inputs=False);
input_x_gradient: gradient x activation; integrated_gradients: LayerIntegratedGradients."""

AGGREGATES = ("sum", "l2")
"""How a position's attribution is summed over the node's hidden dimensions."""

MAX_CONTINUATION = 512
"""Most continuation tokens one call may attribute."""

MAX_STEPS = 512
"""Most integration steps one call may ask for."""

MAX_ROWS = 32768
"""Most rows (continuation tokens x integration steps) one call may run."""


@dataclass(frozen=True)
class TokenAttribution:
    """One token attribution, as the caller asked for it."""

    prompt: torch.Tensor
    """int64 (P,)."""
    continuation: torch.Tensor | None
    """int64 (K,); None attributes `objective` instead."""
    method: str
    node: str = ""
    aggregate: str = "sum"
    n_steps: int | None = None
    integration_method: str = INTEGRATION_METHODS[0]
    baseline_token: int = 0
    objective: Objective | None = None
    internal_batch_size: int | None = None


@dataclass
class TokensAttributed:
    """The scores, on the host, and how they were computed."""

    scores: torch.Tensor
    """(continuation tokens, prompt tokens); (1, prompt tokens) for an objective."""
    values: list[float]
    """Each continuation token's log-probability, or the objective's value."""
    node: str
    device: str
    passes: int = 0
    internal_batch_size: int = 0
    compute_ms: float = 0.0


def error(message: str, reason: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, field=field)


def check_request(request: TokenAttribution, count: int) -> int | None:
    """The integration steps (None for the other methods), every bound checked."""
    if request.method not in METHODS:
        raise error(
            f"attribute_tokens takes the methods {', '.join(METHODS)}, not {request.method!r}",
            "UNKNOWN_METHOD",
            "method",
        )
    if request.aggregate not in AGGREGATES:
        raise error("aggregate must be sum or l2", "BAD_PARAMETER", "aggregate")
    prompt = request.prompt
    if prompt.dtype != torch.int64 or prompt.dim() != 1 or prompt.numel() < 1:
        raise error("prompt must be int64 token ids shaped (P,), P >= 1", "WRONG_SHAPE", "prompt")
    continuation = request.continuation
    if continuation is not None:
        if continuation.dtype != torch.int64 or continuation.dim() != 1:
            raise error(
                "continuation must be int64 token ids shaped (K,)", "WRONG_SHAPE", "continuation"
            )
        if count > MAX_CONTINUATION:
            raise error(
                f"continuation has {count} tokens; one call attributes at most {MAX_CONTINUATION}",
                "OUT_OF_RANGE",
                "continuation",
            )
        if request.objective is not None:
            raise error(
                "a continuation is attributed through its log-probabilities: give a "
                "continuation or an objective, not both",
                "BAD_OBJECTIVE",
                "objective",
            )
    ig = request.method == "integrated_gradients"
    for name in ("n_steps", "integration_method", "baseline_token"):
        given = getattr(request, name) != getattr(TokenAttribution, name, None)
        if given and not ig:
            raise error(f"{name} belongs to integrated_gradients", "BAD_PARAMETER", name)
    if not ig:
        return None
    steps = 50 if request.n_steps is None else request.n_steps
    if not 1 <= steps <= MAX_STEPS:
        raise error(
            f"n_steps is {steps}; it must be in [1, {MAX_STEPS}]", "OUT_OF_RANGE", "n_steps"
        )
    if max(count, 1) * steps > MAX_ROWS:
        raise error(
            f"{count} continuation tokens x {steps} steps is {count * steps} rows; one call "
            f"runs at most {MAX_ROWS}: send fewer tokens or steps",
            "OUT_OF_RANGE",
            "n_steps",
        )
    if request.integration_method not in INTEGRATION_METHODS:
        rule = request.integration_method[:40]
        raise error(f"unknown integration method {rule!r}", "BAD_PARAMETER", "integration_method")
    if request.internal_batch_size is not None and request.internal_batch_size < 1:
        raise error("internal_batch_size must be >= 1", "OUT_OF_RANGE", "internal_batch_size")
    return steps
