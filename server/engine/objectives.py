"""Objectives: the scalar whose gradients a pass computes, taken at a model output or a node."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidArgument
from ..models.model import dtype_name


class LossReduction(enum.Enum):
    """How cross_entropy and mse reduce over elements: torch's `reduction` argument."""

    MEAN = "mean"
    SUM = "sum"


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
    reduction: LossReduction = LossReduction.MEAN
    field: str = "objective"
    parts: tuple[tuple[int, int, Objective], ...] = ()
    """For merged requests (engine/batching.py): (first row, end row, that request's own
    objective); the scalar is the sum of each part's objective on its rows."""


def loss(objective: Objective, site: torch.Tensor) -> torch.Tensor:
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
        return F.cross_entropy(site, labels.to(site.device), reduction=objective.reduction.value)
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
            return F.mse_loss(site, other, reduction=objective.reduction.value)
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
