"""Which of a model's parameters a request wants gradients for, by state-dict name."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidArgument
from .model import Model

ALL = "*"
"""The name that means every parameter."""


def resolve(model: Model, names: Sequence[str]) -> list[int]:
    """Positions in `model.state` of the named parameters, in state order, each once.

    Raises InvalidArgument naming `param_grads[i]` for an unknown name or a buffer.
    """
    positions = {name: i for i, (name, _, _) in enumerate(model.state)}
    wanted: set[int] = set()
    for i, name in enumerate(names):
        if name == ALL:
            wanted.update(p for p, (_, _, is_param) in enumerate(model.state) if is_param)
            continue
        position = positions.get(name)
        if position is None:
            shown = name if len(name) <= 80 else name[:80] + "..."
            raise InvalidArgument(
                f"unknown parameter {shown!r}: not a state-dict name of {model.name} "
                "(DescribeModel lists its parameters)",
                reason="UNKNOWN_PARAMETER",
                field=f"param_grads[{i}]",
            )
        if not model.state[position][2]:
            raise InvalidArgument(
                f"{name!r} is a buffer of {model.name}, not a parameter: it has no gradient",
                reason="NOT_A_PARAMETER",
                field=f"param_grads[{i}]",
            )
        wanted.add(position)
    return sorted(wanted)
