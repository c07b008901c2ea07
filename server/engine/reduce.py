"""Reductions of a target's tensors, computed on the device before the copy to the host.

Pure torch. A reduction reduces over `dims` (default: every dimension but the batch
dimension 0), then keeps the `topk` entries of largest magnitude (per batch row while
dimension 0 survives, else over the whole tensor), then casts to a transfer dtype.
When a target's gradient and activation are both captured, topk picks positions by the
gradient and takes the activation at the same positions, so the two stay aligned and share
one index tensor.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from ..errors import InvalidArgument
from ..models.model import Spec, dtype_name


class Reduce(enum.Enum):
    """What a reduction computes over its dims."""

    SUM = "sum"
    MEAN = "mean"
    ABS_MEAN = "abs_mean"
    """The mean of absolute values."""
    NORM = "norm"
    """The L2 norm: sqrt(sum(x * x))."""
    MAX = "max"
    GRADIENT_X_ACTIVATION = "gradient_x_activation"
    """The sum of gradient times activation; one tensor results."""


TRANSFER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes a target's tensors may travel in."""


@dataclass(frozen=True)
class Reduction:
    """What the caller asked for: reduce over dims, keep the top k, cast to dtype.

    `dims` None means every dimension but 0; `topk` 0 means all entries; `dtype` None keeps
    the node's dtype.
    """

    reduce: Reduce | None = None
    dims: tuple[int, ...] | None = None
    topk: int = 0
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class Applied:
    """A reduction as it ran: dims resolved, and the shape the topk indices point into."""

    reduce: Reduce | None
    dims: tuple[int, ...]
    topk: int
    reduced_shape: tuple[int, ...]


@dataclass(frozen=True)
class Reduced:
    """A target's tensors after its reduction; `indices` holds the topk positions."""

    activation: torch.Tensor | None
    gradient: torch.Tensor | None
    indices: torch.Tensor | None
    applied: Applied | None


def resolve_dims(reduction: Reduction, rank: int) -> tuple[int, ...]:
    """The dims reduced, non-negative and sorted; () when nothing is reduced."""
    if reduction.reduce is None:
        return ()
    if reduction.dims is None:
        return tuple(range(1, rank))
    return tuple(sorted({d % rank for d in reduction.dims})) if rank else ()


def check(reduction: Reduction, spec: Spec, field: str) -> None:
    """Checks a reduction against the node it applies to; `field` is e.g. "targets[2]"."""
    rank = len(spec.dims)
    where = f"{field}.reduction"
    if not spec.dtype.is_floating_point:
        raise InvalidArgument(
            f"{field} has dtype {dtype_name(spec.dtype)}: reductions and "
            "transfer dtypes apply to floating-point nodes only",
            reason="NOT_FLOATING_POINT",
            field=where if reduction.reduce or reduction.topk else f"{field}.dtype",
        )
    if reduction.dims is not None:
        if reduction.reduce is None:
            raise InvalidArgument(
                f"{where}.dims needs a reduce", reason="BAD_REDUCTION", field=f"{where}.dims"
            )
        bad = [d for d in reduction.dims if not -rank <= d < rank]
        if bad:
            raise InvalidArgument(
                f"{where}.dims has {bad[0]}; the node has {rank} dimension(s), so dims lie in "
                f"[{-rank}, {rank})",
                reason="BAD_DIMS",
                field=f"{where}.dims",
            )
        if len({d % rank for d in reduction.dims}) != len(reduction.dims):
            raise InvalidArgument(
                f"{where}.dims names a dimension twice", reason="BAD_DIMS", field=f"{where}.dims"
            )
    if reduction.topk < 0:
        raise InvalidArgument(
            f"{where}.topk must be >= 0", reason="BAD_TOPK", field=f"{where}.topk"
        )
    if reduction.topk:
        dims = resolve_dims(reduction, rank)
        kept = [d.size for i, d in enumerate(spec.dims) if i not in dims]
        per_row = rank > 0 and 0 not in dims
        pool = kept[1:] if per_row else kept
        if all(size is not None for size in pool):
            available = math.prod(size for size in pool if size is not None)
            if reduction.topk > available:
                raise InvalidArgument(
                    f"{where}.topk is {reduction.topk}, but "
                    f"{'each row' if per_row else 'the reduced tensor'} has {available} entries",
                    reason="TOPK_TOO_LARGE",
                    field=f"{where}.topk",
                )
    if reduction.dtype is not None and reduction.dtype not in TRANSFER_DTYPES:
        raise InvalidArgument(
            f"{field}.dtype must be float32, float16 or bfloat16",
            reason="UNSUPPORTED_TRANSFER_DTYPE",
            field=f"{field}.dtype",
        )


def _over(x: torch.Tensor, reduce: Reduce | None, dims: tuple[int, ...]) -> torch.Tensor:
    if reduce is None:
        return x
    if not dims:  # a reduction over no dimension is elementwise; torch would reduce all
        return x.abs() if reduce in (Reduce.ABS_MEAN, Reduce.NORM) else x
    if reduce is Reduce.SUM:
        return x.sum(dim=dims)
    if reduce is Reduce.MEAN:
        return x.mean(dim=dims)
    if reduce is Reduce.ABS_MEAN:
        return x.abs().mean(dim=dims)
    if reduce is Reduce.NORM:
        norm: torch.Tensor = torch.linalg.vector_norm(x, ord=2, dim=dims)
        return norm
    return x.amax(dim=dims)


def apply(
    reduction: Reduction | None,
    activation: torch.Tensor | None,
    gradient: torch.Tensor | None,
    field: str,
) -> Reduced:
    """Reduces a target's captured tensors where they are (on the device)."""
    if reduction is None:
        return Reduced(activation, gradient, None, None)
    rank = (gradient if gradient is not None else activation).dim()  # type: ignore[union-attr]
    dims = resolve_dims(reduction, rank)
    act: torch.Tensor | None
    grad: torch.Tensor | None
    if reduction.reduce is Reduce.GRADIENT_X_ACTIVATION:
        assert activation is not None and gradient is not None
        product = gradient.detach() * activation.detach()
        act, grad = None, _over(product, Reduce.SUM, dims) if dims else product
    else:
        act = None if activation is None else _over(activation.detach(), reduction.reduce, dims)
        grad = None if gradient is None else _over(gradient.detach(), reduction.reduce, dims)
    key = grad if grad is not None else act
    assert key is not None
    reduced_shape = tuple(key.shape)
    indices = None
    k = reduction.topk
    if k:
        per_row = key.dim() > 0 and 0 not in dims
        rows = key.reshape(key.shape[0], -1) if per_row else key.reshape(-1)
        if k > rows.shape[-1]:
            raise InvalidArgument(
                f"{field}.reduction.topk is {k}, but "
                f"{'each row' if per_row else 'the reduced tensor'} has {rows.shape[-1]} entries",
                reason="TOPK_TOO_LARGE",
                field=f"{field}.reduction.topk",
            )
        positions = rows.abs().topk(k, dim=-1, sorted=True).indices
        act = None if act is None else act.reshape(rows.shape).gather(-1, positions)
        grad = None if grad is None else grad.reshape(rows.shape).gather(-1, positions)
        indices = positions
    if reduction.dtype is not None:
        act = None if act is None else act.to(reduction.dtype)
        grad = None if grad is None else grad.to(reduction.dtype)
    applied = Applied(reduction.reduce, dims, k, reduced_shape)
    return Reduced(act, grad, indices, applied)
