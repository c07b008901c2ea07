"""Objectives: the scalar whose gradients the server computes."""

from __future__ import annotations

import operator
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


def _ids(values: Any, name: str) -> list[int]:
    array = np.atleast_1d(np.asarray(values))
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an integer, or one integer per row")
    return [int(i) for i in array]


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
        cls,
        index: int | Sequence[int],
        position: int | None = None,
        output: Output = 0,
        node: str | None = None,
    ) -> Objective:
        """The sum over rows of each row's logit `index` (one index, or one per row).

        On a site shaped (N, C) the index is a class. On a language model's logits shaped
        (N, S, V), `position` picks the sequence position (negative counts from the end; -1
        is the next-token prediction) and the index is a token; the server refuses such a
        site without a position. On other sites the index counts each row's flattened
        elements.
        """
        indices = _ids(index, "index")
        message = pb.LogitObjective(site=_site(output, node), index=indices)
        if position is not None:
            message.position = operator.index(position)
        return cls(pb.Objective(logit=message))

    @classmethod
    def cross_entropy(
        cls,
        labels: Any,
        output: Output = 0,
        node: str | None = None,
        reduction: str = "mean",
        class_dim: int | None = None,
        ignore_index: int = -100,
        shift: bool = False,
    ) -> Objective:
        """F.cross_entropy(logits, labels), with PyTorch's ignore_index.

        Args:
            labels: class indices shaped like the site without its class dimension.
            class_dim: the site's class dimension: 1 (PyTorch's (N, C, ...)) or -1 (a
                language model's (N, S, V)). None infers it from the labels' shape, and the
                server refuses labels that fit both ways; existing (N, C, ...) calls keep
                their meaning.
            ignore_index: labels with this value count for nothing (PyTorch's -100).
            shift: the next-token loss: labels are the input ids (N, S) and the logits at t
                predict token t + 1, exactly what Hugging Face computes with labels=.
        """
        message = pb.CrossEntropyObjective(
            site=_site(output, node),
            labels=encode(np.asarray(labels, dtype=np.int64)),
            reduction=_reduction(reduction),
            shift=bool(shift),
        )
        if class_dim is not None:
            message.class_dim = operator.index(class_dim)
        if ignore_index != -100:
            message.ignore_index = operator.index(ignore_index)
        return cls(pb.Objective(cross_entropy=message))

    @classmethod
    def log_prob(
        cls,
        tokens: Any,
        positions: Any = None,
        output: Output = 0,
        node: str | None = None,
    ) -> Objective:
        """The sum over rows of log_softmax over the vocabulary at each (position, token) pair
        of a site shaped (N, S, V): token log-probabilities.

        Args:
            tokens: token ids, (K,) for every row or (N, K) per row.
            positions: shaped like tokens; negative counts from the end. None: the tokens are
                the last K tokens of the input, each scored from the logits one position
                earlier: log P(continuation | prompt) for inputs = prompt + continuation.
        """
        message = pb.LogProbObjective(
            site=_site(output, node), tokens=encode(np.asarray(tokens, dtype=np.int64))
        )
        if positions is not None:
            message.positions.CopyFrom(encode(np.asarray(positions, dtype=np.int64)))
        return cls(pb.Objective(log_prob=message))

    @classmethod
    def logit_diff(
        cls,
        correct: int | Sequence[int],
        wrong: int | Sequence[int],
        position: int | None = -1,
        output: Output = 0,
        node: str | None = None,
    ) -> Objective:
        """The sum over rows of logit[correct] - logit[wrong] at `position` (the
        indirect-object-identification metric of circuit studies). Token ids: one for every
        row, or one per row. On a site shaped (N, C), pass position=None."""
        return cls._diff(correct, wrong, position, output, node, probabilities=False)

    @classmethod
    def prob_diff(
        cls,
        correct: int | Sequence[int],
        wrong: int | Sequence[int],
        position: int | None = -1,
        output: Output = 0,
        node: str | None = None,
    ) -> Objective:
        """As logit_diff, on the probabilities (softmax over the last dimension)."""
        return cls._diff(correct, wrong, position, output, node, probabilities=True)

    @classmethod
    def _diff(
        cls,
        correct: int | Sequence[int],
        wrong: int | Sequence[int],
        position: int | None,
        output: Output,
        node: str | None,
        probabilities: bool,
    ) -> Objective:
        message = pb.LogitDiffObjective(
            site=_site(output, node),
            correct=_ids(correct, "correct"),
            wrong=_ids(wrong, "wrong"),
            probabilities=probabilities,
        )
        if position is not None:
            message.position = operator.index(position)
        return cls(pb.Objective(logit_diff=message))

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
