"""Results on the wire: a header announcing every tensor, its bytes in chunks of about 1 MiB
(pre-encoded where a chunk fills a message), and the closing summary."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
from google.protobuf.message import Message

from gradtap.v1 import gradtap_pb2 as pb

from ..engine.analysis import Collected
from ..engine.reduce import Applied
from .names import ROLES, WIRE_DTYPES, WIRE_REDUCES

CHUNK_BYTES = 1 << 20
"""Most tensor bytes carried by one stream message."""


def header(tensors: Sequence[Collected]) -> pb.AnalyzeHeader:
    """Announces every tensor of a result, in the order its bytes will follow."""
    result = pb.AnalyzeHeader()
    total = 0
    for i, c in enumerate(tensors):
        t = c.tensor
        byte_size = t.numel() * t.element_size()
        # add() builds the header in place; append() would copy it
        added = result.tensors.add(
            id=i,
            role=ROLES[c.role],
            name=c.name,
            index=c.index,
            dtype=WIRE_DTYPES[t.dtype],
            shape=t.shape,
            byte_size=byte_size,
        )
        total += byte_size
        if c.reduction is not None:
            _reduction_header(added, c.reduction)
    result.total_bytes = total
    return result


def _reduction_header(header: pb.TensorHeader, applied: Applied) -> None:
    """Records in a tensor's header the reduction it went through."""
    header.reduction.SetInParent()
    if applied.reduce is not None:
        header.reduction.reduce = WIRE_REDUCES[applied.reduce]
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
