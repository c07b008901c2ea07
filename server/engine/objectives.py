"""Objectives: the scalar whose gradients a pass computes, taken at a model output or a node.

`check` tests an objective against its site's dtype and shape, from the graph's symbolic
shapes, before the forward pass; `loss` computes it on the site's value (and checks again,
with the real shape, what the symbolic shapes left unknown).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidArgument
from ..models.model import dtype_name

Shape = tuple[int | None, ...]
"""A site's shape; None where the graph's symbolic shapes leave a size unknown."""

IGNORE_INDEX = -100
"""cross_entropy's ignore_index when none is given: PyTorch's."""


class LossReduction(enum.Enum):
    """How cross_entropy and mse reduce over elements: torch's `reduction` argument."""

    MEAN = "mean"
    SUM = "sum"


@dataclass(frozen=True)
class Objective:
    """The scalar to differentiate, taken at a model output or at a node.

    `kind` is one of "sum", "logit", "cross_entropy", "mse", "grad_outputs", "log_prob",
    "logit_diff". `field` is the request field that holds it, used to name the culprit in
    errors.
    """

    kind: str
    output: int = 0
    node: str = ""
    index: tuple[int, ...] = ()
    """logit's index; logit_diff's correct tokens."""
    tensor: torch.Tensor | None = None
    """cross_entropy's labels, mse's expected, grad_outputs' grad_output, log_prob's tokens."""
    reduction: LossReduction = LossReduction.MEAN
    field: str = "objective"
    parts: tuple[tuple[int, int, Objective], ...] = ()
    """For merged requests (engine/batching.py): (first row, end row, that request's own
    objective); the scalar is the sum of each part's objective on its rows."""
    position: int | None = None
    """logit's and logit_diff's sequence position on a site (N, S, V)."""
    wrong: tuple[int, ...] = ()
    """logit_diff's wrong tokens."""
    probabilities: bool = False
    """logit_diff: compare probabilities (softmax) instead of logits."""
    positions: torch.Tensor | None = None
    """log_prob's positions; None: the last K tokens, each scored one position earlier."""
    class_dim: int | None = None
    """cross_entropy's class dimension; None infers it from the labels' shape."""
    ignore_index: int = IGNORE_INDEX
    shift: bool = False
    """cross_entropy: the shifted next-token loss (labels are the input ids)."""
    trim: tuple[tuple[int, int, int], ...] = ()
    """For a merged part padded to a longer sequence (engine/batching.py): (dimension, first
    position, length) of the part's own positions in each sequence dimension of the site."""


def trimmed(site: torch.Tensor, trim: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    """The site's value at a padded part's own positions."""
    for dim, start, length in trim:
        site = site.narrow(dim, start, length)
    return site


def trimmed_shape(shape: Shape, trim: tuple[tuple[int, int, int], ...]) -> Shape:
    """The shape of `trimmed` for a site of this shape."""
    sizes = list(shape)
    for dim, _, length in trim:
        sizes[dim] = length
    return tuple(sizes)


def _error(message: str, reason: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, field=field)


def _text(shape: Shape) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


def _fits(given: Shape, wanted: Shape) -> bool:
    """Equal shapes, where an unknown size fits any."""
    return len(given) == len(wanted) and all(
        a is None or b is None or a == b for a, b in zip(given, wanted)
    )


def _in_range(values: list[int], size: int | None, what: str, field: str) -> None:
    if size is not None and any(v < 0 or v >= size for v in values):
        raise _error(f"{what} must lie in [0, {size})", "OUT_OF_RANGE", field)


def _position(position: int, size: int | None, field: str) -> None:
    if size is not None and not -size <= position < size:
        raise _error(
            f"position {position} is outside the sequence of {size} positions ([{-size}, {size}))",
            "OUT_OF_RANGE",
            field,
        )


def _per_row(values: tuple[int, ...], rows: int | None, what: str, field: str) -> None:
    if not values:
        raise _error(f"{what} is required", "BAD_OBJECTIVE", field)
    if len(values) != 1 and rows is not None and len(values) != rows:
        raise _error(
            f"{what} has {len(values)} values: give one, or one per row ({rows})",
            "BAD_OBJECTIVE",
            field,
        )


def check(objective: Objective, shape: Shape, dtype: torch.dtype) -> None:
    """Raises InvalidArgument, naming the field, unless the objective fits a site of this
    dtype and shape. Needs no forward pass: the engine calls it with the shape the graph's
    symbolic shapes give for the request's inputs."""
    f = objective.field
    if not (dtype.is_floating_point or dtype.is_complex):
        raise _error(
            f"the objective's site has dtype {dtype_name(dtype)}; it needs floating point",
            "NOT_DIFFERENTIABLE",
            f"{f}.site",
        )
    kind = objective.kind
    if kind == "logit":
        _check_logit(objective, shape)
    elif kind == "cross_entropy":
        _class_dim(objective, shape)
    elif kind in ("mse", "grad_outputs"):
        name = "expected" if kind == "mse" else "grad_output"
        other = _required(objective, name)
        if not _fits(tuple(other.shape), shape):
            raise _error(
                f"{name} has shape {list(other.shape)}; the site has shape {_text(shape)}",
                "WRONG_SHAPE",
                f"{f}.{name}",
            )
        if not other.is_floating_point():
            raise _error(f"{name} must be floating point", "WRONG_DTYPE", f"{f}.{name}")
    elif kind == "log_prob":
        _check_log_prob(objective, shape)
    elif kind == "logit_diff":
        _check_logit_diff(objective, shape)
    elif kind != "sum":
        raise _error(f"unknown objective {kind!r}", "BAD_OBJECTIVE", f)


def _sequence_site(objective: Objective, shape: Shape, what: str) -> None:
    if len(shape) != 3:
        raise _error(
            f"{what} reads a site shaped (N, S, V), a language model's logits; the site "
            f"has shape {_text(shape)}",
            "WRONG_SHAPE",
            f"{objective.field}.site",
        )


def _check_logit(objective: Objective, shape: Shape) -> None:
    f = objective.field
    if not objective.index:
        raise _error("logit needs an index", "BAD_OBJECTIVE", f"{f}.index")
    if not shape:
        raise _error("logit needs a site with at least one dimension", "BAD_OBJECTIVE", f)
    if objective.position is not None:
        _sequence_site(objective, shape, "logit with a position")
        _position(objective.position, shape[1], f"{f}.position")
        rows, width = shape[0], shape[2]
    elif len(shape) == 3:
        raise _error(
            f"the site has shape {_text(shape)}, (N, S, V): give logit a position, the "
            "sequence position to read (-1 for the last)",
            "POSITION_REQUIRED",
            f"{f}.position",
        )
    elif len(shape) == 1:
        rows, width = 1, shape[0]
    else:
        rows = shape[0]
        known = [s for s in shape[1:] if s is not None]
        width = math.prod(known) if len(known) == len(shape) - 1 else None
    _in_range(list(objective.index), width, "logit index", f"{f}.index")
    _per_row(objective.index, rows if len(shape) >= 2 else 1, "logit index", f"{f}.index")


def _class_dim(objective: Objective, shape: Shape) -> int:
    """The class dimension cross_entropy reads (non-negative), every check made."""
    f = objective.field
    labels = _required(objective, "labels")
    rank = len(shape)
    if rank < 2:
        raise _error(
            f"cross_entropy needs logits with a batch and a class dimension; the site has "
            f"shape {_text(shape)}",
            "WRONG_SHAPE",
            f"{f}.site",
        )
    if labels.dtype != torch.int64:
        raise _error("labels must be int64 class indices", "WRONG_DTYPE", f"{f}.labels")
    given = objective.class_dim
    if given is not None and not (-rank <= given < rank and given % rank != 0):
        raise _error(
            f"class_dim {given} is not a dimension of the site {_text(shape)} other than the "
            "batch dimension 0",
            "BAD_OBJECTIVE",
            f"{f}.class_dim",
        )
    if objective.shift:
        if rank != 3 or (given is not None and given % rank != rank - 1):
            raise _error(
                "shift is the next-token loss of logits shaped (N, S, V), class_dim -1; the "
                f"site has shape {_text(shape)}",
                "BAD_OBJECTIVE",
                f"{f}.shift",
            )
        given = -1
    labels_shape = tuple(labels.shape)

    def without(d: int) -> Shape:
        return shape[:d] + shape[d + 1 :]

    if given is not None:
        dim = given % rank
    else:
        fits = [d for d in (1, rank - 1) if _fits(labels_shape, without(d))]
        if len(fits) == 2 and fits[0] != fits[1]:
            raise _error(
                f"labels of shape {list(labels_shape)} fit logits of shape {_text(shape)} "
                "with the classes on dimension 1 and on the last: give class_dim (1 or -1)",
                "CLASS_DIM_AMBIGUOUS",
                f"{f}.class_dim",
            )
        dim = fits[0] if fits else 1
    if not _fits(labels_shape, without(dim)):
        raise _error(
            f"labels have shape {list(labels_shape)}; logits of shape {_text(shape)} with "
            f"classes on dimension {dim} need labels of shape {_text(without(dim))}",
            "WRONG_SHAPE",
            f"{f}.labels",
        )
    classes = shape[dim]
    kept = labels[labels != objective.ignore_index]
    if classes is not None and kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= classes):
        raise _error(
            f"labels must lie in [0, {classes}) or be ignore_index ({objective.ignore_index})",
            "OUT_OF_RANGE",
            f"{f}.labels",
        )
    return dim


def _check_log_prob(objective: Objective, shape: Shape) -> None:
    f = objective.field
    tokens = _required(objective, "tokens")
    _sequence_site(objective, shape, "log_prob")
    rows, length, vocabulary = shape
    if tokens.dtype != torch.int64:
        raise _error("tokens must be int64 token ids", "WRONG_DTYPE", f"{f}.tokens")
    if tokens.dim() not in (1, 2) or tokens.shape[-1] == 0:
        raise _error(
            f"tokens have shape {list(tokens.shape)}: give (K,) for every row or (N, K), K >= 1",
            "WRONG_SHAPE",
            f"{f}.tokens",
        )
    if tokens.dim() == 2 and rows is not None and tokens.shape[0] != rows:
        raise _error(
            f"tokens have shape {list(tokens.shape)}; per-row tokens need {rows} rows",
            "WRONG_SHAPE",
            f"{f}.tokens",
        )
    _in_range(tokens.reshape(-1).tolist(), vocabulary, "tokens", f"{f}.tokens")
    positions = objective.positions
    if positions is None:
        count = tokens.shape[-1]
        if length is not None and count >= length:
            raise _error(
                f"{count} tokens cannot be the continuation of an input of {length} "
                "positions: each is scored from the position before it, so at most "
                f"{length - 1}; or give positions",
                "OUT_OF_RANGE",
                f"{f}.tokens",
            )
        return
    if positions.dtype != torch.int64:
        raise _error("positions must be int64", "WRONG_DTYPE", f"{f}.positions")
    if tuple(positions.shape) != tuple(tokens.shape):
        raise _error(
            f"positions have shape {list(positions.shape)}; they pair with tokens of shape "
            f"{list(tokens.shape)}",
            "WRONG_SHAPE",
            f"{f}.positions",
        )
    if length is not None:
        low, high = int(positions.min()), int(positions.max())
        for p in (low, high):
            _position(p, length, f"{f}.positions")


def _check_logit_diff(objective: Objective, shape: Shape) -> None:
    f = objective.field
    if len(shape) == 3:
        if objective.position is None:
            raise _error(
                f"the site has shape {_text(shape)}, (N, S, V): give logit_diff a position",
                "POSITION_REQUIRED",
                f"{f}.position",
            )
        _position(objective.position, shape[1], f"{f}.position")
    elif len(shape) == 2:
        if objective.position is not None:
            raise _error(
                f"the site has shape {_text(shape)}, (N, C), which has no positions: leave "
                "position unset (None)",
                "BAD_OBJECTIVE",
                f"{f}.position",
            )
    else:
        raise _error(
            f"logit_diff reads a site shaped (N, S, V) or (N, C); the site has shape "
            f"{_text(shape)}",
            "WRONG_SHAPE",
            f"{f}.site",
        )
    for name, values in (("correct", objective.index), ("wrong", objective.wrong)):
        _per_row(values, shape[0], name, f"{f}.{name}")
        _in_range(list(values), shape[-1], name, f"{f}.{name}")


def loss(objective: Objective, site: torch.Tensor) -> torch.Tensor:
    """The objective's scalar at `site`, checking first that the objective fits the site."""
    check(objective, tuple(site.shape), site.dtype)
    kind = objective.kind
    if kind == "sum":
        return site.sum()
    if kind == "logit":
        if objective.position is not None:
            site = site[:, objective.position]
        return _picked(site, objective.index)
    if kind == "cross_entropy":
        return _cross_entropy(objective, site)
    if kind in ("mse", "grad_outputs"):
        other = _required(objective, "expected" if kind == "mse" else "grad_output")
        other = other.to(device=site.device, dtype=site.dtype)
        if kind == "mse":
            return F.mse_loss(site, other, reduction=objective.reduction.value)
        return (site * other).sum()
    if kind == "log_prob":
        return _log_prob(objective, site)
    # logit_diff
    logits = site[:, objective.position] if objective.position is not None else site
    if objective.probabilities:
        logits = logits.softmax(dim=-1)
    return _picked(logits, objective.index) - _picked(logits, objective.wrong)


def _picked(site: torch.Tensor, index: tuple[int, ...]) -> torch.Tensor:
    """The sum over rows of each row's (flattened) element `index`: one index for every row,
    or one per row."""
    rows = site.reshape(site.shape[0], -1) if site.dim() >= 2 else site.reshape(1, -1)
    if len(index) == 1:
        return rows[:, index[0]].sum()
    picked = torch.tensor(index, device=site.device)
    return rows[torch.arange(rows.shape[0], device=site.device), picked].sum()


def _cross_entropy(objective: Objective, site: torch.Tensor) -> torch.Tensor:
    dim = _class_dim(objective, tuple(site.shape))
    labels = _required(objective, "labels").to(site.device)
    if objective.shift:  # the logits at t predict the label at t + 1, as Hugging Face's
        site, labels = site[:, :-1], labels[:, 1:]
    return F.cross_entropy(
        site.movedim(dim, 1),
        labels,
        ignore_index=objective.ignore_index,
        reduction=objective.reduction.value,
    )


def _log_prob(objective: Objective, site: torch.Tensor) -> torch.Tensor:
    rows, length, _ = site.shape
    tokens = _required(objective, "tokens").to(site.device)
    count = tokens.shape[-1]
    if objective.positions is None:
        positions = torch.arange(length - count - 1, length - 1, device=site.device)
    else:
        positions = objective.positions.to(site.device) % length
    tokens = tokens.expand(rows, count)
    positions = positions.expand(rows, count)
    logits = site[torch.arange(rows, device=site.device)[:, None], positions]  # (N, K, V)
    return logits.log_softmax(dim=-1).gather(-1, tokens[..., None]).sum()


def _required(objective: Objective, name: str) -> torch.Tensor:
    if objective.tensor is None:
        raise _error(f"{objective.kind} needs {name}", "BAD_OBJECTIVE", f"{objective.field}.{name}")
    return objective.tensor
