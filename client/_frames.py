"""Reassembling tensors framed as header, chunks and summary, the framing of every stream."""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np

from gradtap.v1 import gradtap_pb2 as pb

from ._errors import GradtapError
from ._shm import SharedRegion
from ._tensor import NUMPY_DTYPES


class Chunk(Protocol):
    """A slice of one tensor's bytes: a TensorChunk, or a RawChunk decoded by hand."""

    @property
    def tensor_id(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def data(self) -> bytes | memoryview: ...


@dataclass(frozen=True)
class RawChunk:
    """A TensorChunk decoded without protobuf: its data is a view into the received bytes."""

    tensor_id: int
    offset: int
    data: memoryview


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def single_chunk(data: bytes, chunks_tag: int) -> RawChunk | None:
    """The one TensorChunk of a message that holds nothing else, or None: a response
    deserializer returns it so that 1 MiB chunk messages skip protobuf's copy of their data."""
    try:
        if not data or data[0] != chunks_tag:
            return None
        size, pos = _varint(data, 1)
        if pos + size != len(data):
            return None
        tensor_id = offset = 0
        while pos < len(data):
            tag, pos = _varint(data, pos)
            if tag == 0x08:
                tensor_id, pos = _varint(data, pos)
            elif tag == 0x10:
                offset, pos = _varint(data, pos)
            elif tag == 0x1A:
                length, pos = _varint(data, pos)
                if pos + length != len(data):
                    return None
                return RawChunk(tensor_id, offset, memoryview(data)[pos:])
            else:
                return None
    except ValueError:
        return None
    return None


RELEASE_EVERY = 32 << 20
"""Bytes received between two returns of freed heap memory to the system (see _trim)."""


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere.

    gRPC hands every received message to Python as a fresh bytes object, 1 MiB for a chunk,
    freed once copied into its array; glibc keeps such freed blocks in its heap, fragmented,
    and a 128 MiB result raised a fresh client's peak by 1.15-1.57x its size (4 runs).
    Returning the free pages every RELEASE_EVERY bytes kept it to 1.14-1.18x, with no
    process-wide malloc setting (which would be the caller's to choose)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: glibc's, if any
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def _trim(pad: int) -> None:
    """Returns the heap's free pages to the system, where glibc can."""
    trim = _malloc_trim()
    if trim is not None:
        trim(pad)


def broken(message: str) -> GradtapError:
    """The error for a stream that breaks the framing rules."""
    return GradtapError(grpc.StatusCode.DATA_LOSS, message)


class Frames:
    """Copies each chunk straight into its preallocated array, checking order and sizes.

    `finish` accepts only a complete set: every byte of every announced tensor. With a
    shared-memory `region`, a header may say the tensors are already in it (AnalyzeHeader
    .shared_memory): the arrays are then views of the region and no chunk may follow.
    """

    def __init__(self, region: SharedRegion | None = None) -> None:
        self.region = region
        self.in_region = False
        self.headers: list[pb.TensorHeader] | None = None
        self.arrays: list[np.ndarray] = []
        self._bytes: list[np.ndarray] = []
        self._filled: list[int] = []
        self.finished = False
        self.received = 0

    def feed(self, header: pb.AnalyzeHeader | None, chunks: Iterable[Chunk]) -> None:
        """One message's header (None when it has none) and chunks, in stream order."""
        if self.finished:
            raise broken("the stream went on after its summary")
        if header is not None:
            if self.headers is not None:
                raise broken("the stream sent a second header")
            if header.shared_memory:
                self._views(list(header.tensors))
            else:
                self._allocate(list(header.tensors))
        for chunk in chunks:
            if self.headers is None:
                raise broken("the stream sent tensor bytes before its header")
            if self.in_region:
                raise broken("the stream sent tensor bytes for a result in shared memory")
            self._copy(chunk)

    def finish(self, tensor_count: int) -> None:
        """The summary arrived: checks that every announced tensor is complete."""
        if self.headers is None:
            raise broken("the stream sent its summary before a header")
        if tensor_count != len(self.headers):
            raise broken("the summary's tensor count does not match the header")
        for i, (filled, raw) in enumerate(zip(self._filled, self._bytes)):
            if filled != raw.size:
                raise broken(f"tensor {i} is incomplete: {filled} of {raw.size} bytes")
        self.finished = True

    def _allocate(self, headers: list[pb.TensorHeader]) -> None:
        for i, h in enumerate(headers):
            dtype = NUMPY_DTYPES.get(h.dtype)
            shape = tuple(h.shape)
            if h.id != i or dtype is None or any(d < 0 for d in shape):
                raise broken(f"tensor header {i} is malformed")
            if math.prod(shape) * dtype.itemsize != h.byte_size:
                raise broken(f"tensor header {i}: byte_size does not match shape and dtype")
            array = np.empty(shape, dtype=dtype)
            self.arrays.append(array)
            self._bytes.append(array.reshape(-1).view(np.uint8))
            self._filled.append(0)
        self.headers = headers

    def _views(self, headers: list[pb.TensorHeader]) -> None:
        if self.region is None:
            raise broken("the server wrote into shared memory that the call did not offer")
        for i, h in enumerate(headers):
            array = self.region.array(h)
            if h.id != i or array is None:
                raise broken(f"tensor header {i} points outside the shared-memory region")
            self.arrays.append(array)
            self._bytes.append(array.reshape(-1).view(np.uint8))
            self._filled.append(h.byte_size)
        self.headers = headers
        self.in_region = True

    def _copy(self, chunk: Chunk) -> None:
        if chunk.tensor_id >= len(self._bytes):
            raise broken(f"a chunk names unknown tensor {chunk.tensor_id}")
        target = self._bytes[chunk.tensor_id]
        start, size = chunk.offset, len(chunk.data)
        if start != self._filled[chunk.tensor_id] or start + size > target.size:
            raise broken(f"tensor {chunk.tensor_id}: chunk at offset {start} is out of order")
        target[start : start + size] = np.frombuffer(chunk.data, dtype=np.uint8)
        self._filled[chunk.tensor_id] = start + size
        before = self.received
        self.received += size
        if before // RELEASE_EVERY != self.received // RELEASE_EVERY:
            _trim(0)
