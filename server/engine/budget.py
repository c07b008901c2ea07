"""The size of a result, estimated from the graph's shapes before any work is done."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ResourceExhausted
from ..models.model import ALL_PARAMETERS, Dim, Model
from .analysis import Analysis


def _bindings(model: Model, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """Symbol name -> size, from the inputs (already checked against the specs); tensors on
    the meta device do, as only their shapes are read."""
    bound: dict[str, int] = {}
    for spec, tensor in zip(model.inputs, inputs):
        for dim, size in zip(spec.dims, tensor.shape):
            if dim.size is None and dim.expr is not None and dim.expr.is_Symbol:
                bound[dim.symbol] = int(size)
    return bound


def _size(dim: Dim, bound: dict[str, int]) -> int:
    if dim.size is not None:
        return dim.size
    if dim.symbol in bound:
        return bound[dim.symbol]
    if dim.expr is not None:  # a derived size such as 2*s77
        value = dim.expr.subs({s: bound.get(str(s), 0) for s in dim.expr.free_symbols})
        if value.is_number:
            return max(int(value), 0)
    return dim.max if dim.max is not None else 0


def tensor_bytes(model: Model, analysis: Analysis) -> list[int]:
    """The bytes of each tensor the result will hold: captured tensors, input and parameter
    gradients, outputs. Reduced targets are left out (their results are small)."""
    bound = _bindings(model, analysis.inputs)
    sizes = []
    for target in analysis.targets:
        node = model.resolve(target.name)
        if node is None or target.reduction is not None:
            continue
        spec = model.nodes[node].spec
        nbytes = math.prod(_size(d, bound) for d in spec.dims) * spec.dtype.itemsize
        sizes += [nbytes] * (int(target.activation) + int(target.gradient))
    if analysis.input_gradients:
        sizes += [t.numel() * t.element_size() for t in analysis.inputs if t.is_floating_point()]
    if analysis.outputs:
        for spec in model.outputs:
            sizes.append(math.prod(_size(d, bound) for d in spec.dims) * spec.dtype.itemsize)
    if not analysis.param_grads:
        return sizes
    wanted = set(analysis.param_grads)
    for name, value, is_param in model.state:
        if is_param and (ALL_PARAMETERS in wanted or name in wanted):
            sizes.append(value.numel() * value.element_size())
    return sizes


def result_bytes(model: Model, analysis: Analysis) -> int:
    """The bytes the result will hold (see tensor_bytes)."""
    return sum(tensor_bytes(model, analysis))


def check(model: Model, analysis: Analysis, limit: int) -> list[int]:
    """Refuses, before any memory is spent, a request whose result would exceed `limit`;
    returns the estimated bytes of each tensor (see tensor_bytes)."""
    sizes = tensor_bytes(model, analysis)
    estimate = sum(sizes)
    if estimate > limit:
        raise ResourceExhausted(
            f"the result would hold {estimate} bytes; this server sends at most {limit} "
            "per request (use smaller batches, fewer targets or reductions)",
            reason="RESULT_TOO_LARGE",
        )
    return sizes
