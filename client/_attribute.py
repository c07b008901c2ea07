"""Attribution calls: encoding Captum-style parameters, reassembling the attribution."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradtap.v1 import gradtap_pb2 as pb

from ._frames import Frames, broken
from ._request import model_ref
from ._tensor import encode

METHODS: dict[str, pb.AttributionMethod.ValueType] = {
    "saliency": pb.ATTRIBUTION_METHOD_SALIENCY,
    "input_x_gradient": pb.ATTRIBUTION_METHOD_INPUT_X_GRADIENT,
    "integrated_gradients": pb.ATTRIBUTION_METHOD_INTEGRATED_GRADIENTS,
    "smoothgrad": pb.ATTRIBUTION_METHOD_SMOOTHGRAD,
    "guided_backprop": pb.ATTRIBUTION_METHOD_GUIDED_BACKPROP,
    "layer_gradient_x_activation": pb.ATTRIBUTION_METHOD_LAYER_GRADIENT_X_ACTIVATION,
    "layer_grad_cam": pb.ATTRIBUTION_METHOD_LAYER_GRAD_CAM,
    "layer_integrated_gradients": pb.ATTRIBUTION_METHOD_LAYER_INTEGRATED_GRADIENTS,
    "layer_conductance": pb.ATTRIBUTION_METHOD_LAYER_CONDUCTANCE,
}
"""Method names, as Captum's classes are named in snake case (smoothgrad: its noise tunnel)."""

INTEGRATION_METHODS: dict[str, pb.IntegrationMethod.ValueType] = {
    "gausslegendre": pb.INTEGRATION_METHOD_GAUSSLEGENDRE,
    "riemann_left": pb.INTEGRATION_METHOD_RIEMANN_LEFT,
    "riemann_right": pb.INTEGRATION_METHOD_RIEMANN_RIGHT,
    "riemann_middle": pb.INTEGRATION_METHOD_RIEMANN_MIDDLE,
    "riemann_trapezoid": pb.INTEGRATION_METHOD_RIEMANN_TRAPEZOID,
}

_INTS = ("n_steps", "internal_batch_size", "nt_samples", "nt_samples_batch_size", "seed")
_BOOLS = ("abs", "relu_attributions", "multiply_by_inputs", "attr_dim_summation")
PARAMS = frozenset((*_INTS, *_BOOLS, "stdevs", "method", "baselines"))
"""Every parameter name the methods take; the server says which method takes which."""


def _targets(target: Any) -> list[int]:
    if target is None:
        return []
    values = np.atleast_1d(np.asarray(target))
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError("target must be a class index, or one class index per row")
    return [int(v) for v in values]


def _params(params: Mapping[str, Any], inputs: Sequence[np.ndarray]) -> pb.AttributionParams:
    unknown = sorted(set(params) - PARAMS)
    if unknown:
        raise TypeError(
            f"attribute() got unknown parameter(s) {', '.join(unknown)}; the parameters are "
            + ", ".join(sorted(PARAMS))
        )
    message = pb.AttributionParams()
    for name, value in params.items():
        if value is None:
            continue  # None means Captum's default, as in Captum
        if name in _INTS:
            number = operator.index(value)
            if number < 0:
                raise ValueError(f"{name} must be >= 0, not {number}")
            setattr(message, name, number)
        elif name in _BOOLS:
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, not {value!r}")
            setattr(message, name, bool(value))
        elif name == "stdevs":
            message.stdevs = float(value)
        elif name == "method":
            if value not in INTEGRATION_METHODS:
                raise ValueError(
                    f"method must be one of {', '.join(INTEGRATION_METHODS)}, not {value!r}"
                )
            message.method = INTEGRATION_METHODS[value]
        else:  # baselines: a scalar or an array, in the attributed input's dtype
            baselines = np.asarray(value)
            floating = [a for a in inputs if np.issubdtype(a.dtype, np.floating)]
            if floating and np.issubdtype(baselines.dtype, np.number):
                baselines = baselines.astype(floating[0].dtype, copy=False)
            message.baselines.CopyFrom(encode(baselines))
            if baselines.ndim == 0:  # encode() sends a scalar as shape [1]
                del message.baselines.shape[:]
    return message


def attribute_request(
    model: str,
    inputs: Any,
    method: str,
    target: Any,
    layer: str | None,
    *,
    output: int,
    digest: str | None,
    params: Mapping[str, Any],
) -> pb.AttributeRequest:
    """Encodes an attribute call: one array or a list of arrays, Captum's parameters."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if output < 0:
        raise ValueError("output must be >= 0")
    arrays = [np.asarray(a) for a in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
    return pb.AttributeRequest(
        model=model_ref(model, digest),
        inputs=[encode(a) for a in arrays],
        method=METHODS[method],
        index=_targets(target),
        output=output,
        node=layer or "",
        params=_params(params, arrays),
    )


class AttributionAssembler:
    """Feeds Attribute stream messages in order; `result()` is the complete attribution."""

    def __init__(self) -> None:
        self._frames = Frames()
        self.summary: pb.AttributeSummary | None = None

    def feed(self, message: pb.AttributeResponse) -> None:
        self._frames.feed(message.header if message.HasField("header") else None, message.chunks)
        if message.HasField("summary"):
            self._frames.finish(message.summary.tensor_count)
            self.summary = message.summary

    def result(self) -> np.ndarray:
        """The attribution; GradtapError(DATA_LOSS) if the stream was cut short."""
        if self.summary is None:
            raise broken("the stream ended before its summary; the result is incomplete")
        if len(self._frames.arrays) != 1:
            raise broken(f"the stream sent {len(self._frames.arrays)} tensors instead of one")
        return self._frames.arrays[0]
