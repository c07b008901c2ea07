"""Objectives: the scalar whose gradients the server computes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gradtap.v1 import gradtap_pb2 as pb

from . import _legacy as legacy
from ._tensor import encode

_REDUCTIONS: dict[str, pb.LossReduction.ValueType] = {
    "mean": pb.LOSS_REDUCTION_MEAN,
    "sum": pb.LOSS_REDUCTION_SUM,
}


Output = int | str
"""An output by position (0) or by name, as describe() names it ("logits")."""


def output_fields(output: Output) -> dict[str, Any]:
    """The request fields that pick `output`: {"output": 2} or {"output_name": "logits"}."""
    if isinstance(output, str):
        if not output:
            raise ValueError("output must be a position or a name, not an empty string")
        return {"output_name": output}
    if isinstance(output, bool) or not isinstance(output, (int, np.integer)):
        raise TypeError(f"output must be a position (int) or a name (str), not {output!r}")
    if output < 0:
        raise ValueError("output must be >= 0")
    return {"output": int(output)}


def _site(output: Output, node: str | None) -> pb.ObjectiveSite:
    return pb.ObjectiveSite(node=node or "", **output_fields(output))


def _reduction(reduction: str) -> pb.LossReduction.ValueType:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    return _REDUCTIONS[reduction]


class Objective:
    """The scalar to differentiate, taken at a model output or at an intermediate node.

    Build one with the class methods. Every constructor takes what it compares with first,
    then the site: `output` picks among a model's outputs, by position (0) or by the name
    describe() gives it ("logits"); `node` takes the objective at a graph node or module
    path instead.
    """

    def __init__(self, message: pb.Objective) -> None:
        self.message = message

    def __repr__(self) -> str:
        kind = self.message.WhichOneof("kind")
        site = getattr(self.message, kind).site if kind else None
        if site and site.node:
            where = f"node={site.node!r}"
        elif site and site.output_name:
            where = f"output={site.output_name!r}"
        else:
            where = f"output={site.output if site else 0}"
        return f"Objective.{kind}({where})"

    @classmethod
    def sum(cls, output: Output = 0, node: str | None = None) -> Objective:
        """The sum of every element of the output (or node)."""
        return cls(pb.Objective(sum=pb.SumObjective(site=_site(output, node))))

    @classmethod
    def logit(
        cls, index: int | Sequence[int], output: Output = 0, node: str | None = None
    ) -> Objective:
        """The sum over rows of element `index` of each row; or one index per row."""
        indices = [int(i) for i in np.atleast_1d(np.asarray(index, dtype=np.int64))]
        return cls(pb.Objective(logit=pb.LogitObjective(site=_site(output, node), index=indices)))

    @classmethod
    def cross_entropy(
        cls, labels: Any, output: Output = 0, node: str | None = None, reduction: str = "mean"
    ) -> Objective:
        """F.cross_entropy(logits, labels): labels are class indices, one per row."""
        message = pb.CrossEntropyObjective(
            site=_site(output, node),
            labels=encode(np.asarray(labels, dtype=np.int64)),
            reduction=_reduction(reduction),
        )
        return cls(pb.Objective(cross_entropy=message))

    @classmethod
    @legacy.accepts(legacy.mse_arguments)
    def mse(
        cls, expected: Any, output: Output = 0, node: str | None = None, reduction: str = "mean"
    ) -> Objective:
        """F.mse_loss(site, expected): `expected` has the site's shape; with `node`, the site
        is that node's activation."""
        message = pb.MseObjective(
            site=_site(output, node),
            expected=encode(np.asarray(expected)),
            reduction=_reduction(reduction),
        )
        return cls(pb.Objective(mse=message))

    @classmethod
    def grad_outputs(cls, array: Any, output: Output = 0, node: str | None = None) -> Objective:
        """A vector-Jacobian product: `array` is the upstream gradient at the site."""
        message = pb.GradOutputsObjective(
            site=_site(output, node), grad_output=encode(np.asarray(array))
        )
        return cls(pb.Objective(grad_outputs=message))
