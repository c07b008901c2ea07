"""Targets: a node to capture, optionally reduced on the server so that less crosses the wire."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gradtap.v1 import gradtap_pb2 as pb

REDUCES: dict[str, pb.Reduce.ValueType] = {
    "sum": pb.REDUCE_SUM,
    "mean": pb.REDUCE_MEAN,
    "abs_mean": pb.REDUCE_ABS_MEAN,
    "norm": pb.REDUCE_NORM,
    "max": pb.REDUCE_MAX,
    "gradient_x_activation": pb.REDUCE_GRADIENT_X_ACTIVATION,
}
"""The reductions, by the name Target takes."""

TRANSFER_DTYPES: dict[str, pb.DType.ValueType] = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
}
"""The dtypes a target's tensors may travel in."""

CAPTURES: dict[str, pb.Capture.ValueType] = {
    "gradient": pb.CAPTURE_GRADIENT,
    "activation": pb.CAPTURE_ACTIVATION,
    "both": pb.CAPTURE_GRADIENT_AND_ACTIVATION,
}
"""What a Target may capture, by name."""

REDUCE_NAMES = {code: name for name, code in REDUCES.items()}


@dataclass(frozen=True)
class Target:
    """A graph node or module path to capture, optionally reduced on the server.

    The reduction runs on the server's device before anything is copied or sent, and
    applies to the target's gradient and to its activation alike.

    Args:
        name: a graph-node name or module path, as DescribeModel lists them; results are
            keyed by it.
        reduce: None (send the tensor whole), "sum", "mean", "abs_mean" (mean of absolute
            values), "norm" (L2) or "max", taken over `dims`; or "gradient_x_activation":
            the sum over `dims` of gradient times activation (dims=-1: one value per
            token), one tensor that arrives in `Result.gradients[name]` (the target then
            captures the gradient alone).
        dims: the dimensions to reduce; negative values count from the end, as in numpy.
            Default: every dimension except the batch dimension 0, one value per row.
            (2, 3) over an (N, C, H, W) map gives per-channel values (Grad-CAM weights).
        topk: keep only the k entries of largest magnitude (values keep their sign), sorted
            by decreasing magnitude: per batch row while dimension 0 survives the reduction,
            else over the whole reduced tensor. Their flat row-major positions arrive in
            `Result.topk_indices[name]`. With both gradient and activation captured, the
            positions are the gradient's and the activation is taken at the same positions.
        dtype: the transfer dtype, "float32", "float16" or "bfloat16"; cast on the server
            after the reduction. bfloat16 arrives as an ml_dtypes.bfloat16 array.
        as_float32: convert the received arrays to float32 (e.g. for bfloat16 transfers).
        capture: "gradient", "activation" or "both"; by default what the call asks for
            (the gradient, and the activation with activations=True). A name may appear
            twice with different captures, e.g. a reduced gradient and a whole activation.
    """

    name: str
    reduce: str | None = None
    dims: Sequence[int] | None = None
    topk: int | None = None
    dtype: str | None = None
    as_float32: bool = False
    capture: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a target needs a name, e.g. Target('relu_1')")
        if self.reduce is not None and self.reduce not in REDUCES:
            raise ValueError(f"reduce must be None or one of {', '.join(REDUCES)}")
        if self.dims is not None:
            dims = tuple(int(d) for d in np.atleast_1d(np.asarray(self.dims, dtype=np.int64)))
            if self.reduce is None:
                raise ValueError("dims needs a reduce, e.g. Target(name, 'abs_mean', dims=(2, 3))")
            if not dims:
                raise ValueError("dims=() reduces nothing; leave dims out for all but dim 0")
            object.__setattr__(self, "dims", dims)
        if self.topk is not None and (int(self.topk) != self.topk or self.topk < 1):
            raise ValueError("topk must be a positive integer")
        if self.dtype is not None and self.dtype not in TRANSFER_DTYPES:
            raise ValueError(f"dtype must be None or one of {', '.join(TRANSFER_DTYPES)}")
        if self.capture is not None and self.capture not in CAPTURES:
            raise ValueError(f"capture must be None or one of {', '.join(CAPTURES)}")

    def message(self, capture: pb.Capture.ValueType) -> pb.TargetLayer:
        """The wire form of this target, capturing `capture`."""
        if self.capture is not None:
            capture = CAPTURES[self.capture]
        elif self.reduce == "gradient_x_activation":
            capture = pb.CAPTURE_GRADIENT  # one tensor: the product, sent as the gradient
        layer = pb.TargetLayer(name=self.name, capture=capture)
        if self.reduce is not None or self.topk:
            layer.reduction.reduce = REDUCES[self.reduce] if self.reduce else pb.REDUCE_UNSPECIFIED
            layer.reduction.dims.extend(self.dims or ())
            layer.reduction.topk = int(self.topk or 0)
        if self.dtype is not None:
            layer.dtype = TRANSFER_DTYPES[self.dtype]
        return layer


TargetLike = str | Target
"""A target name, or a Target with a reduction."""

Targets = TargetLike | Sequence[TargetLike] | None
"""What a call's `targets` takes: one target, a sequence of them, or None for none."""


def as_targets(targets: object) -> tuple[TargetLike, ...]:
    """`targets` as a tuple: one name or Target, or a sequence of them; TypeError for anything
    else, raised before a call sends anything."""
    if targets is None:
        return ()
    if isinstance(targets, (str, Target)):
        return (targets,)
    if not isinstance(targets, Iterable) or isinstance(targets, (bytes, bytearray, Mapping)):
        raise TypeError(
            "targets must be a node name, a Target, or a sequence of them, "
            f"not {type(targets).__name__}"
        )
    found = tuple(targets)
    for i, target in enumerate(found):
        if not isinstance(target, (str, Target)):
            raise TypeError(
                f"targets[{i}] must be a node name or a Target, not {type(target).__name__}"
            )
    return found


@dataclass(frozen=True)
class Reduction:
    """What the server did to a target's tensors before sending them.

    Attributes:
        reduce: the reduction over dims, or None.
        dims: the dimensions reduced, non-negative and sorted (the default filled in).
        topk: how many entries were kept, or None.
        dtype: the dtype the tensors travelled in.
        reduced_shape: the shape after reducing dims and before taking the topk; topk
            indices are flat positions in its dimensions after the first (per row) or in
            all of it (when dims included 0): np.unravel_index(i, reduced_shape[1:]).
    """

    reduce: str | None
    dims: tuple[int, ...]
    topk: int | None
    dtype: str
    reduced_shape: tuple[int, ...]


def target_message(target: TargetLike, capture: pb.Capture.ValueType) -> pb.TargetLayer:
    """The wire form of a target name or Target."""
    if isinstance(target, Target):
        return target.message(capture)
    return pb.TargetLayer(name=str(target), capture=capture)
