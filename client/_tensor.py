"""Numpy arrays on the wire: dtype tables, encoding inputs, decoding specs."""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np

from gradtap.v1 import gradtap_pb2 as pb

NUMPY_DTYPES: dict[pb.DType.ValueType, np.dtype[Any]] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT16: np.dtype("<i2"),
    pb.DTYPE_INT8: np.dtype("i1"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_BOOL: np.dtype("?"),
}
"""Wire dtype -> numpy dtype (little-endian)."""

DTYPE_NAMES: dict[pb.DType.ValueType, str] = {
    code: ("bfloat16" if code == pb.DTYPE_BFLOAT16 else dtype.name)
    for code, dtype in NUMPY_DTYPES.items()
}
"""Wire dtype -> the name users see, e.g. "float32"."""

_WIRE_BY_NAME = {name: code for code, name in DTYPE_NAMES.items()}
_WIRE_BY_DTYPE = {dtype: code for code, dtype in NUMPY_DTYPES.items()}
"""The common case in one lookup (numpy computes dtype.name in Python, on every access)."""


def wire_dtype(dtype: np.dtype[Any]) -> pb.DType.ValueType:
    """The wire dtype of a numpy dtype; ValueError for an unsupported one."""
    code = _WIRE_BY_DTYPE.get(dtype)
    if code is not None:
        return code
    name = "bfloat16" if dtype == ml_dtypes.bfloat16 else dtype.name
    code = _WIRE_BY_NAME.get(name)
    if code is None:
        supported = ", ".join(sorted(_WIRE_BY_NAME))
        raise ValueError(f"dtype {dtype} is not supported; use one of {supported}")
    return code


def encode(array: Any) -> pb.Tensor:
    """A numpy array (or anything np.asarray takes) as a wire Tensor: row-major, little-endian."""
    a = np.asarray(array)
    code = wire_dtype(a.dtype)
    a = np.asarray(a, dtype=NUMPY_DTYPES[code], order="C")  # keeps 0-d arrays 0-d
    return pb.Tensor(dtype=code, shape=a.shape, data=a.tobytes())


def decode(message: pb.Tensor) -> np.ndarray:
    """A wire Tensor as a numpy array (a copy)."""
    dtype = NUMPY_DTYPES[message.dtype]
    shape = tuple(message.shape)
    if len(message.data) != math.prod(shape) * dtype.itemsize:
        raise ValueError("tensor data does not match its shape and dtype")
    return np.frombuffer(message.data, dtype=dtype).reshape(shape).copy()
