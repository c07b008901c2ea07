"""Running aggregates of the gradients over the items of an AnalyzeMany stream.

The aggregate of a target is taken over the full gradient of every item, batch row by batch
row, in float64 on the host:
- the mean gradient: the gradient averaged over every batch row (dimension 0) of every
  item, shaped like one row;
- the mean absolute gradient per channel: |gradient| averaged over every dimension except
  dimension 1 (the channel of an (N, C, ...) tensor, the feature of an (N, F) one).
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidArgument
from .analysis import Analysis, Collected, Outcome, Role


class Aggregator:
    """Running sums of each target's gradient over the items of one stream."""

    def __init__(self) -> None:
        self.items = 0
        self.rows = 0
        self._names: list[str] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._abs_sums: dict[str, torch.Tensor] = {}
        self._abs_counts: dict[str, int] = {}
        self._row_counts: dict[str, int] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._loss = 0.0

    @staticmethod
    def check(analysis: Analysis) -> None:
        """Aggregates need each target's full gradient: no reduction, topk or dtype."""
        for i, target in enumerate(analysis.targets):
            if target.gradient and target.reduction is not None:
                raise InvalidArgument(
                    f"targets[{i}] has a reduction; aggregates are taken over full gradients",
                    reason="REDUCTION_WITH_AGGREGATE",
                    field=f"targets[{i}].reduction",
                )

    def add(self, analysis: Analysis, outcome: Outcome) -> None:
        """Adds one item's gradients; the first item fixes the targets and their shapes."""
        gradients = {c.name: c.tensor for c in outcome.tensors if c.role is Role.GRADIENT}
        if self.items == 0:
            self._names = list(gradients)
        elif list(gradients) != self._names:
            raise InvalidArgument(
                f"this item's gradient targets {sorted(gradients)} differ from the first "
                f"item's {sorted(self._names)}; an aggregate needs the same targets throughout",
                reason="AGGREGATE_MISMATCH",
                field="targets",
            )
        for name, g in gradients.items():
            self._add(name, g)
        first = analysis.inputs[0] if analysis.inputs else None
        self.rows += int(first.shape[0]) if first is not None and first.dim() else 1
        self.items += 1
        self._loss += outcome.loss

    def _add(self, name: str, gradient: torch.Tensor) -> None:
        g = gradient.detach().to(torch.float64)
        rows = g if g.dim() else g.reshape(1)
        total = rows.sum(dim=0)
        absolute = g.abs()
        channels = absolute.sum(dim=[d for d in range(g.dim()) if d != 1]) if g.dim() > 1 else None
        abs_sum = channels if channels is not None else absolute.sum()
        count = g.numel() // max(1, g.shape[1]) if g.dim() > 1 else max(1, g.numel())
        if name not in self._sums:
            self._sums[name] = total
            self._abs_sums[name] = abs_sum
            self._abs_counts[name] = count
            self._row_counts[name] = rows.shape[0]
            self._dtypes[name] = gradient.dtype
            return
        if total.shape != self._sums[name].shape:
            raise InvalidArgument(
                f"the gradient at {name!r} has rows of shape {list(total.shape)}; earlier items "
                f"had {list(self._sums[name].shape)}, and an aggregate needs one shape",
                reason="AGGREGATE_MISMATCH",
                field="inputs",
            )
        self._sums[name] += total
        self._abs_sums[name] += abs_sum
        self._abs_counts[name] += count
        self._row_counts[name] += rows.shape[0]

    @property
    def loss(self) -> float:
        """The mean of the items' losses; NaN without items or objective."""
        return self._loss / self.items if self.items else math.nan

    def collected(self) -> list[Collected]:
        """The aggregate as result tensors: a mean gradient and a mean |gradient| per target."""
        tensors = []
        for name in self._names:
            dtype = self._dtypes[name]
            mean = self._sums[name] / self._row_counts[name]
            mean_abs = self._abs_sums[name] / self._abs_counts[name]
            tensors.append(Collected(Role.MEAN_GRADIENT, name, 0, mean.to(dtype).contiguous()))
            tensors.append(
                Collected(Role.MEAN_ABS_GRADIENT, name, 0, mean_abs.to(dtype).contiguous())
            )
        return tensors
