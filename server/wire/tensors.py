"""Request tensors: every check of a tensor's header and byte length, then the copy.

A request is checked in two steps so that nothing is allocated before all of it passed:
`declared` checks one tensor's message and answers its dtype and shape as a tensor on the
meta device (torch's tensor without storage), which the model's input specs and the result
budget can be checked against; `copied` then copies its bytes out.
"""

from __future__ import annotations

import math
import sys

import torch

from gradtap.v1 import gradtap_pb2 as pb

from ..errors import InvalidArgument, ResourceExhausted
from .names import TORCH_DTYPES

if sys.byteorder != "little":  # the wire is little-endian and tensors are sent as raw memory
    raise ImportError("gradtap's server needs a little-endian machine")

MAX_RANK = 8
"""Most dimensions a request tensor may have."""

_META = torch.device("meta")


def declared(message: pb.Tensor, field: str, max_elements: int) -> torch.Tensor:
    """Checks a request tensor's dtype, rank, size and byte length; returns a tensor of its
    dtype and shape on the meta device. Nothing of the tensor's size is allocated."""
    dtype = TORCH_DTYPES.get(message.dtype)
    if dtype is None:
        name = pb.DType.Name(message.dtype) if message.dtype in pb.DType.values() else message.dtype
        raise InvalidArgument(
            f"{field}.dtype {name} is not supported",
            reason="UNSUPPORTED_DTYPE",
            field=f"{field}.dtype",
        )
    shape = list(message.shape)
    if len(shape) > MAX_RANK:
        raise InvalidArgument(
            f"{field} has rank {len(shape)}; at most {MAX_RANK} dimensions are accepted",
            reason="RANK_TOO_HIGH",
            field=f"{field}.shape",
        )
    if any(d < 0 for d in shape):
        raise InvalidArgument(
            f"{field}.shape has a negative dimension", reason="WRONG_SHAPE", field=f"{field}.shape"
        )
    elements = math.prod(shape)
    # An empty tensor can still declare absurd sizes ([2**62, 2**62, 0]) that overflow
    # torch's storage arithmetic: bound the product of the non-zero sizes as well.
    if elements > max_elements or math.prod(d for d in shape if d) > max_elements:
        raise ResourceExhausted(
            f"{field}.shape {shape} declares more than the {max_elements} elements the server "
            "accepts",
            reason="TENSOR_TOO_LARGE",
            field=f"{field}.shape",
        )
    expected = elements * dtype.itemsize
    if len(message.data) != expected:
        raise InvalidArgument(
            f"{field}.data has {len(message.data)} bytes; shape {shape} of "
            f"{pb.DType.Name(message.dtype)} needs {expected}",
            reason="DATA_SIZE_MISMATCH",
            field=f"{field}.data",
        )
    if dtype == torch.bool and message.data.translate(None, b"\x00\x01"):
        raise InvalidArgument(
            f"{field}.data holds a bool that is neither 0 nor 1",
            reason="BAD_BOOL",
            field=f"{field}.data",
        )
    return torch.empty(shape, dtype=dtype, device=_META)


def copied(message: pb.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, copied out of a message that `declared` passed as `meta`."""
    if not message.data:
        return torch.empty(meta.shape, dtype=meta.dtype)
    flat = torch.frombuffer(bytearray(message.data), dtype=torch.uint8)
    return flat.view(meta.dtype).reshape(meta.shape)


def decode(message: pb.Tensor, field: str, max_elements: int) -> torch.Tensor:
    """Checks a request tensor (see `declared`), then copies it out."""
    return copied(message, declared(message, field, max_elements))
