"""The size of a result, estimated from the graph's shapes before any work is done."""

from __future__ import annotations

import math

from ..errors import ResourceExhausted
from ..models.model import ALL_PARAMETERS, Dim, Model, bindings, size_of
from .analysis import Analysis


def _size(dim: Dim, bound: dict[str, int]) -> int:
    """The dimension's size, or its largest where the graph computes it from data."""
    size = size_of(dim, bound)
    if size is not None:
        return size
    return dim.max if dim.max is not None else 0


def tensor_bytes(model: Model, analysis: Analysis) -> list[int]:
    """The bytes of each tensor the result will hold: captured tensors, input and parameter
    gradients, outputs. Reduced targets are left out (their results are small)."""
    bound = bindings(model, analysis.inputs)
    sizes = []
    for target in analysis.targets:
        node = model.resolve(target.name)
        if node is None or target.reduction is not None:
            continue
        spec = model.nodes[node].spec
        nbytes = math.prod(_size(d, bound) for d in spec.dims) * spec.dtype.itemsize
        sizes += [nbytes] * (int(target.activation) + int(target.gradient) + int(target.patching))
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
