"""Encoding requests: every call's arguments as the contract's messages, checked before sending."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from gradtap.v1 import gradtap_pb2 as pb

from ._objective import Objective
from ._target import TargetLike, target_message
from ._tensor import encode

V = TypeVar("V", bound=int)


def enum_names(enum: Any, prefix: str) -> dict[str, Any]:
    """The values of a contract enum by their names in lower case, without `prefix` and
    without the UNSPECIFIED value: ATTRIBUTION_METHOD_SALIENCY -> "saliency"."""
    return {
        name.removeprefix(prefix).lower(): value
        for name, value in enum.items()
        if not name.endswith("_UNSPECIFIED")
    }


ATTRIBUTION_METHODS: dict[str, pb.AttributionMethod.ValueType] = enum_names(
    pb.AttributionMethod, "ATTRIBUTION_METHOD_"
)
"""Method names, as Captum's classes are named in snake case (smoothgrad: its noise tunnel)."""

INTEGRATION_METHODS: dict[str, pb.IntegrationMethod.ValueType] = enum_names(
    pb.IntegrationMethod, "INTEGRATION_METHOD_"
)
"""Captum's integration rules (its `method`), for attribute(..., integration_method=)."""

PERTURB_METHODS: dict[str, pb.PerturbMethod.ValueType] = enum_names(
    pb.PerturbMethod, "PERTURB_METHOD_"
)
NORMS: dict[str, pb.PerturbNorm.ValueType] = {
    "Linf": pb.PERTURB_NORM_LINF,
    "L2": pb.PERTURB_NORM_L2,
}
PRECISIONS = {"full": pb.PRECISION_FULL, "bfloat16": pb.PRECISION_BFLOAT16_AUTOCAST}

_INTS = ("n_steps", "internal_batch_size", "nt_samples", "nt_samples_batch_size", "seed")
_BOOLS = ("abs", "relu_attributions", "multiply_by_inputs", "attr_dim_summation")
PARAMS = frozenset((*_INTS, *_BOOLS, "stdevs", "integration_method", "baselines"))
"""Every parameter name the attribution methods take; the server says which takes which."""


def choice(table: Mapping[str, V], value: str, what: str) -> V:
    """`table[value]`; ValueError naming the choices for anything else."""
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(table)}")
    return table[value]


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A model name: what the server accepts (a name with ".." is never loaded)."""
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A version; it never holds ".." either."""


def model_ref(model: str, digest: str | None, version: str | None = None) -> pb.Model:
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a model name, e.g. 'seed-convnet'")
    return pb.Model(name=model, digest=digest or "", version=checked_version(version))


def checked_name(name: object) -> str:
    """A model name the server can load: MODEL_NAME without "..", else ValueError."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"model name {str(name)[:140]!r} must match {MODEL_NAME.pattern} without '..'"
        )
    return name


def checked_version(version: object) -> str:
    """A version (VERSION without ".."), or "" for None or "" (the default); else ValueError."""
    if version is None or version == "":
        return ""
    if not isinstance(version, str) or not VERSION.fullmatch(version) or ".." in version:
        raise ValueError(f"version {str(version)[:80]!r} must match {VERSION.pattern} without '..'")
    return version


def arrays(inputs: Any) -> list[np.ndarray]:
    """One array, or a list or tuple of arrays, as a list of arrays."""
    return [np.asarray(a) for a in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]


def objective_or_none(objective: object) -> Objective | None:
    """`objective`, checked to be an Objective (or None)."""
    if objective is not None and not isinstance(objective, Objective):
        raise TypeError("objective must be built with gradtap.client.Objective")
    return objective


def analyze_request(
    model: str,
    inputs: Any,
    targets: Sequence[TargetLike],
    objective: Objective | None,
    *,
    input_grads: bool,
    activations: bool,
    outputs: bool,
    param_grads: str | Sequence[str],
    digest: str | None,
    precision: str,
    version: str | None = None,
) -> pb.AnalyzeRequest:
    """Encodes an analyze call: one array or a list of arrays, targets, an objective."""
    if objective_or_none(objective) is None:
        capture = pb.CAPTURE_ACTIVATION  # without an objective only activations make sense
    else:
        capture = pb.CAPTURE_GRADIENT_AND_ACTIVATION if activations else pb.CAPTURE_GRADIENT
    request = pb.AnalyzeRequest(
        model=model_ref(model, digest, version),
        inputs=[encode(a) for a in arrays(inputs)],
        targets=[target_message(t, capture) for t in targets],
        param_grads=[param_grads] if isinstance(param_grads, str) else list(param_grads),
        input_grads=input_grads,
        outputs=outputs,
        precision=choice(PRECISIONS, precision, "precision"),
    )
    if objective is not None:
        request.objective.CopyFrom(objective.message)
    return request


def many_options(
    aggregate: bool, per_item: bool, max_in_flight: int, flags: dict[str, Any]
) -> pb.AnalyzeManyOptions:
    """The stream's options; what per_item=False leaves out of `flags` (each item's
    input_grads, activations, outputs, param_grads) is not asked of the server at all."""
    if int(max_in_flight) != max_in_flight or max_in_flight < 1:
        raise ValueError("max_in_flight must be a positive integer")
    if not per_item and not aggregate:
        raise ValueError("per_item=False needs aggregate=True, or nothing would come back")
    if not per_item:
        flags.update(input_grads=False, activations=False, outputs=False, param_grads=())
    return pb.AnalyzeManyOptions(aggregate=aggregate, omit_items=not per_item)


def many_requests(
    model: str,
    items: Iterable[Any],
    targets: Sequence[TargetLike],
    objective: Objective | Callable[[int], Objective | None] | None,
    options: pb.AnalyzeManyOptions,
    **flags: Any,
) -> Iterator[pb.AnalyzeManyRequest]:
    """One request per item, encoded only when it is about to be sent."""
    for k, inputs in enumerate(items):
        item_objective = (
            objective if objective is None or isinstance(objective, Objective) else objective(k)
        )
        item = analyze_request(model, inputs, targets, item_objective, **flags)
        yield pb.AnalyzeManyRequest(item=item, options=options if k == 0 else None)


def class_index(index: Any) -> list[int]:
    if index is None:
        return []
    values = np.atleast_1d(np.asarray(index))
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError("index must be a class index, or one class index per row")
    return [int(v) for v in values]


def attribution_params(
    params: Mapping[str, Any], inputs: Sequence[np.ndarray]
) -> pb.AttributionParams:
    """Captum's parameters; None leaves one at Captum's default."""
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
        elif name == "integration_method":
            message.method = choice(INTEGRATION_METHODS, value, "integration_method")
        else:  # baselines: a scalar or an array, in the attributed input's dtype
            baselines = np.asarray(value)
            floating = [a for a in inputs if np.issubdtype(a.dtype, np.floating)]
            if floating and np.issubdtype(baselines.dtype, np.number):
                baselines = baselines.astype(floating[0].dtype, copy=False)
            message.baselines.CopyFrom(encode(baselines))
            if baselines.ndim == 0:  # encode() sends a scalar as shape [1]
                del message.baselines.shape[:]
    return message


def float_like(inputs: Sequence[np.ndarray], value: Any) -> np.ndarray:
    """`value` as an array in the dtype of the floating-point input (float32 without one)."""
    floating = [a for a in inputs if np.issubdtype(a.dtype, np.floating)]
    return np.asarray(value).astype(floating[0].dtype if floating else np.float32, copy=False)


def text_rows(inputs: Any, text: str | None, texts: Sequence[str] | None) -> list[str] | None:
    """The rows of text an analyze call sends (text= or texts=); None when it sends inputs."""
    if text is None and texts is None:
        if inputs is None:
            raise TypeError("analyze needs inputs, or text= (texts=) for a model with a tokenizer")
        return None
    if inputs is not None:
        raise TypeError("give inputs or text (texts), not both")
    if text is not None and texts is not None:
        raise TypeError("give text or texts, not both")
    rows = [text] if text is not None else list(texts or [])
    if isinstance(texts, str) or not rows or not all(isinstance(r, str) for r in rows):
        raise TypeError("text must be a string, texts a non-empty list of strings")
    return rows
