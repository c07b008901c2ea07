"""Padded merging: rows of different lengths in one batch, where the model declares how to
pad them (server/models/padding.py).

Each request's rows are padded to the longest sequence of the batch, on the declared side:
the mask input with 0, `input_ids` with the declared padding token, every other input with
0. What comes back is trimmed to the request's own positions in every dimension of the
sequence, and each request's objective is taken on its own positions (Objective.trim), so a
request gets what it gets alone. Merging is refused (requests then merge only with others of
equal length) wherever a touched value has a dimension computed from the sequence length
other than the sequence itself (a `sequence - 1`, a flattened `batch * sequence`): there its
own positions cannot be cut out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.model import Model, Spec

TOKEN_IDS = "input_ids"
"""The input padded with the declared padding token; every other input takes 0."""


@dataclass(frozen=True)
class Padder:
    """How a model's requests of different lengths are padded and trimmed."""

    symbol: str
    """The sequence dimension's symbol (the mask input's dimension 1)."""
    left: bool
    values: tuple[int, ...]
    """The value padding each input."""
    dims: tuple[tuple[int, ...], ...]
    """Each input's dimensions along the sequence."""

    def length(self, inputs: Sequence[torch.Tensor]) -> int:
        """A request's sequence length."""
        for tensor, dims in zip(inputs, self.dims):
            if dims:
                return int(tensor.shape[dims[0]])
        return 0

    def pad(self, inputs: Sequence[torch.Tensor], length: int) -> list[torch.Tensor]:
        """The request's inputs padded to `length` along the sequence."""
        padded = []
        for tensor, dims, value in zip(inputs, self.dims, self.values):
            for d in dims:
                missing = length - tensor.shape[d]
                if missing <= 0:
                    continue
                shape = list(tensor.shape)
                shape[d] = missing
                fill = torch.full(shape, value, dtype=tensor.dtype, device=tensor.device)
                tensor = torch.cat([fill, tensor] if self.left else [tensor, fill], dim=d)
            padded.append(tensor)
        return padded

    def trim(self, spec: Spec, own: int, length: int) -> tuple[tuple[int, int, int], ...]:
        """(dimension, first position, length) of a request's own positions in a value of
        this spec, merged at `length`: see objectives.trimmed."""
        if own == length:
            return ()
        start = length - own if self.left else 0
        return tuple(
            (d, start, own) for d, dim in enumerate(spec.dims) if dim.symbol == self.symbol
        )


def padder(model: Model, batch: str) -> Padder | None:
    """The model's Padder, or None when it declares no padding, or its sequence dimension is
    the batch's, or an input has a dimension computed from the sequence length."""
    padding = model.padding
    if padding is None or padding.mask not in model.input_nodes:
        return None
    mask = model.inputs[model.input_nodes.index(padding.mask)]
    symbol = mask.dims[1].symbol if len(mask.dims) == 2 else ""
    if not symbol or symbol == batch or not all(trimmable(spec, symbol) for spec in model.inputs):
        return None
    values = tuple(padding.pad_token_id if n == TOKEN_IDS else 0 for n in model.input_nodes)
    dims = tuple(
        tuple(d for d, dim in enumerate(spec.dims) if dim.symbol == symbol) for spec in model.inputs
    )
    return Padder(symbol, padding.side == "left", values, dims)


def trimmable(spec: Spec, symbol: str) -> bool:
    """True when each dimension of the value is fixed, the sequence itself, or free of it."""
    for dim in spec.dims:
        if dim.size is not None or dim.symbol == symbol:
            continue
        free = getattr(dim.expr, "free_symbols", None)
        if free is None or symbol in {str(s) for s in free}:
            return False
    return True
