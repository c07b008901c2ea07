"""Tensors on the wire: checking and decoding request tensors, framing results into chunks."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
from google.protobuf.message import Message

from gradtap.v1 import gradtap_pb2 as pb

from .engine import Collected, Role
from .errors import InvalidArgument, ResourceExhausted
from .reduce import Applied

if sys.byteorder != "little":  # the wire is little-endian and tensors are sent as raw memory
    raise ImportError("gradtap's server needs a little-endian machine")

CHUNK_BYTES = 1 << 20
"""Most tensor bytes carried by one stream message."""

MAX_RANK = 8
"""Most dimensions a request tensor may have."""

TORCH_DTYPES: dict[pb.DType.ValueType, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT64: torch.float64,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_INT32: torch.int32,
    pb.DTYPE_INT16: torch.int16,
    pb.DTYPE_INT8: torch.int8,
    pb.DTYPE_UINT8: torch.uint8,
    pb.DTYPE_BOOL: torch.bool,
}
"""The dtype allow-list: wire dtype -> torch dtype."""

WIRE_DTYPES: dict[torch.dtype, pb.DType.ValueType] = {v: k for k, v in TORCH_DTYPES.items()}

ROLES = {
    Role.ACTIVATION: pb.TENSOR_ROLE_ACTIVATION,
    Role.GRADIENT: pb.TENSOR_ROLE_GRADIENT,
    Role.INPUT_GRADIENT: pb.TENSOR_ROLE_INPUT_GRADIENT,
    Role.OUTPUT: pb.TENSOR_ROLE_OUTPUT,
    Role.PARAMETER_GRADIENT: pb.TENSOR_ROLE_PARAMETER_GRADIENT,
    Role.TOPK_INDICES: pb.TENSOR_ROLE_TOPK_INDICES,
    Role.MEAN_GRADIENT: pb.TENSOR_ROLE_MEAN_GRADIENT,
    Role.MEAN_ABS_GRADIENT: pb.TENSOR_ROLE_MEAN_ABS_GRADIENT,
    Role.ATTRIBUTION: pb.TENSOR_ROLE_ATTRIBUTION,
    Role.ADVERSARIAL: pb.TENSOR_ROLE_ADVERSARIAL,
}

REDUCES: dict[pb.Reduce.ValueType, str] = {
    pb.REDUCE_SUM: "sum",
    pb.REDUCE_MEAN: "mean",
    pb.REDUCE_ABS_MEAN: "abs_mean",
    pb.REDUCE_NORM: "norm",
    pb.REDUCE_MAX: "max",
}
"""Wire reduce -> the engine's name (server/reduce.py); REDUCE_UNSPECIFIED means none."""


def decode(message: pb.Tensor, field: str, max_elements: int) -> torch.Tensor:
    """Checks a request tensor's dtype, rank, size and byte length, then copies it out.

    Every check happens before any tensor memory is allocated.
    """
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
    flat = torch.frombuffer(bytearray(message.data), dtype=torch.uint8) if expected else None
    if flat is None:
        return torch.empty(shape, dtype=dtype)
    return flat.view(dtype).reshape(shape)


def header(tensors: Sequence[Collected]) -> pb.AnalyzeHeader:
    """Announces every tensor of a result, in the order its bytes will follow."""
    result = pb.AnalyzeHeader()
    for i, c in enumerate(tensors):
        result.tensors.append(
            pb.TensorHeader(
                id=i,
                role=ROLES[c.role],
                name=c.name,
                index=c.index,
                dtype=WIRE_DTYPES[c.tensor.dtype],
                shape=list(c.tensor.shape),
                byte_size=c.tensor.numel() * c.tensor.element_size(),
            )
        )
        result.total_bytes += result.tensors[-1].byte_size
        if c.reduction is not None:
            _reduction_header(result.tensors[-1], c.reduction)
    return result


def _reduction_header(header: pb.TensorHeader, applied: Applied) -> None:
    """Records in a tensor's header the reduction it went through."""
    codes = {name: code for code, name in REDUCES.items()}
    header.reduction.SetInParent()
    header.reduction.reduce = codes.get(applied.reduce or "", pb.REDUCE_UNSPECIFIED)
    header.reduction.dims.extend(applied.dims)
    header.reduction.topk = applied.topk
    header.reduced_shape.extend(applied.reduced_shape)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(field_number: int, tensor_id: int, offset: int, data: memoryview) -> bytes:
    """A response holding one TensorChunk in field `field_number`, encoded by hand.

    Building a protobuf message would copy the 1 MiB of data twice (into the message, then
    into its serialization); this copies it once. The bytes are exactly what protobuf
    would write, so any client parses them as the declared message.
    """
    inner = b"\x08" + _varint(tensor_id) + b"\x10" + _varint(offset) + b"\x1a" + _varint(len(data))
    size = len(inner) + len(data)
    return b"".join((_varint(field_number << 3 | 2), _varint(size), inner, data))


def serialize(message: object) -> bytes:
    """The response serializer: pre-encoded chunk messages pass through untouched."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()  # type: ignore[attr-defined, no-any-return]


def on_host(tensors: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each tensor on the host, in order. CUDA tensors are copied through pinned memory on a
    side stream, the next one's copy overlapping the caller's streaming of the current one."""
    cuda = [t for t in tensors if t.device.type == "cuda"]
    if not cuda:
        yield from tensors
        return
    stream = torch.cuda.Stream(cuda[0].device)  # type: ignore[no-untyped-call]

    def start(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if t.device.type != "cuda":
            return t, None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(stream)
        t.record_stream(stream)  # keep the device memory until the copy is done
        return host, done

    pending = start(tensors[0])
    for i in range(len(tensors)):
        following = start(tensors[i + 1]) if i + 1 < len(tensors) else None
        host, done = pending
        if done is not None:
            done.synchronize()
        yield host
        if following is not None:
            pending = following


M = TypeVar("M", bound=Message)


def frames(tensors: Sequence[Collected], first: M, summary: Message) -> Iterator[M | bytes]:
    """Packs the header, the tensors' bytes and the summary into messages of about 1 MiB.

    `first` is the stream's first message (holding the header); the message type needs
    `chunks` (repeated TensorChunk) and `summary` fields, and `summary` is of the latter's
    type (AnalyzeResponse, AttributeResponse, PerturbResponse, ...). Small results travel as one
    message; a big tensor goes out as pre-encoded messages of one 1 MiB chunk each. Each
    chunk names its tensor and offset.
    """
    kind = type(first)
    chunks_field = kind.DESCRIPTOR.fields_by_name["chunks"].number
    message: M | None = first
    room = CHUNK_BYTES
    for i, host in enumerate(on_host([c.tensor for c in tensors])):
        raw = host.reshape(-1).view(torch.uint8).numpy().data
        offset = 0
        while offset < len(raw):
            if room == 0:
                assert message is not None
                yield message
                message, room = None, CHUNK_BYTES
            if message is None and len(raw) - offset >= CHUNK_BYTES:
                yield encode_chunk(chunks_field, i, offset, raw[offset : offset + CHUNK_BYTES])
                offset += CHUNK_BYTES
                continue
            if message is None:
                message = kind()
            n = min(room, len(raw) - offset)
            message.chunks.add(tensor_id=i, offset=offset, data=raw[offset : offset + n].tobytes())  # type: ignore[attr-defined]
            offset += n
            room -= n
    if message is None:
        message = kind()
    message.summary.CopyFrom(summary)  # type: ignore[attr-defined]
    yield message
