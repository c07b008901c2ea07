"""The contract's enums as the engine's values: every table derived from the proto's names, once.

A proto value maps to the engine's value of the same name: REDUCE_ABS_MEAN is
Reduce.ABS_MEAN, ATTRIBUTION_METHOD_LAYER_GRAD_CAM is "layer_grad_cam", PERTURB_NORM_LINF
is Captum's "Linf", DTYPE_BFLOAT16 is torch.bfloat16. The prefix is the one the enum's
UNSPECIFIED value carries; that value maps to nothing. The tables are built when this module
is imported, and the import fails if the contract and the engine disagree on a name, so a
value added on one side alone never reaches a request.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

import torch

from gradtap.v1 import gradtap_pb2 as pb

from ..engine import adversarial, attribution, captum_bridge, tokens
from ..engine.analysis import Role
from ..engine.objectives import LossReduction
from ..engine.reduce import Reduce

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

K = TypeVar("K", bound=int)
V = TypeVar("V")


def _table(proto: _EnumTypeWrapper[K], values: Iterable[V], name: Callable[[V], str]) -> dict[K, V]:
    """{proto value: engine value}, paired by name without the prefix, case aside."""
    unspecified = next(n for n, number in proto.items() if number == 0)
    prefix = unspecified.removesuffix("UNSPECIFIED")
    wire = {n.removeprefix(prefix): number for n, number in proto.items() if number != 0}
    engine = {name(v).upper(): v for v in values}
    if set(wire) != set(engine):
        raise ImportError(
            f"the contract's {proto.DESCRIPTOR.name} and the engine disagree on "
            f"{sorted(set(wire) ^ set(engine))}"
        )
    return {wire[n]: engine[n] for n in wire}


E = TypeVar("E", bound=enum.Enum)


def _members(proto: _EnumTypeWrapper[K], engine: type[E]) -> dict[K, E]:
    return _table(proto, engine, lambda member: member.name)


def _spelled(proto: _EnumTypeWrapper[K], names: Iterable[str]) -> dict[K, str]:
    return _table(proto, names, lambda n: n)


def _reversed(table: dict[K, V]) -> dict[V, K]:
    return {v: k for k, v in table.items()}


TORCH_DTYPES = {
    number: getattr(torch, name.removeprefix("DTYPE_").lower())
    for name, number in pb.DType.items()
    if number != pb.DTYPE_UNSPECIFIED
}
"""The dtype allow-list: wire dtype -> torch dtype (DTYPE_INT64 is torch.int64)."""
WIRE_DTYPES = _reversed(TORCH_DTYPES)

ROLES = _reversed(_members(pb.TensorRole, Role))
"""The engine's role of a result tensor -> the wire's."""

REDUCES = _members(pb.Reduce, Reduce)
WIRE_REDUCES = _reversed(REDUCES)

LOSS_REDUCTIONS = _members(pb.LossReduction, LossReduction)

ATTRIBUTION_METHODS = _spelled(pb.AttributionMethod, attribution.METHODS)
INTEGRATION_METHODS = _spelled(pb.IntegrationMethod, captum_bridge.INTEGRATION_METHODS)
PERTURB_METHODS = _spelled(pb.PerturbMethod, adversarial.METHODS)
NORMS = _spelled(pb.PerturbNorm, adversarial.NORMS)
TOKEN_AGGREGATES = _spelled(pb.TokenAggregate, tokens.AGGREGATES)
