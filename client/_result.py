"""Results: reassembling an Analyze stream into numpy arrays, and model descriptions."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradtap.v1 import gradtap_pb2 as pb

from ._frames import Frames, broken
from ._shm import SharedRegion
from ._target import Reduction, reduction
from ._tensor import DTYPE_NAMES


@dataclass
class Result:
    """What one analysis returned, as numpy arrays keyed as they were asked for.

    Attributes:
        gradients: target name -> gradient of the objective at that target.
        activations: target name -> the target's forward value.
        input_grads: input position -> gradient with respect to that input.
        outputs: the model's outputs, in order (when requested).
        loss: the objective's value (NaN without an objective).
        metadata: model, model_digest, device, torch_version, replica, timings (ms),
            bytes_received (tensor bytes that crossed the wire) and transport ("stream", or
            "shared_memory" when the server wrote the tensors into a SharedRegion).
        param_grads: parameter state-dict name -> gradient of the objective.
        topk_indices: target name -> flat positions of the entries a topk target kept.
        reductions: target name -> what the server reduced, for targets with a reduction.
    """

    gradients: dict[str, np.ndarray] = field(default_factory=dict)
    activations: dict[str, np.ndarray] = field(default_factory=dict)
    input_grads: dict[int, np.ndarray] = field(default_factory=dict)
    outputs: list[np.ndarray] = field(default_factory=list)
    loss: float = float("nan")
    metadata: dict[str, Any] = field(default_factory=dict)
    param_grads: dict[str, np.ndarray] = field(default_factory=dict)
    topk_indices: dict[str, np.ndarray] = field(default_factory=dict)
    reductions: dict[str, Reduction] = field(default_factory=dict)

    def plot(
        self,
        path: str | os.PathLike[str],
        name: str | int | None = None,
        *,
        image: Any = None,
        row: int = 0,
        kind: str | None = None,
        size: tuple[int, int] | None = None,
        title: str | None = None,
    ) -> Path:
        """Writes a PNG of one returned tensor; needs matplotlib (the `plot` extra).

        Args:
            path: where to write the PNG.
            name: a target name (its gradient), an input position (its input gradient),
                or None for input gradient 0 if returned, else the first target gradient.
            image: the input the tensor belongs to (the same batch), drawn under an
                input gradient's heatmap.
            row: the batch row to draw.
            kind: "overlay", "bars" or "channels"; by default chosen from the shape, as
                gradtap.client.plot_attribution chooses it (docs/plots.md).
            size: (width, height) of the PNG in pixels.
            title: a title drawn on the picture.

        Returns:
            The path written.
        """
        from ._plot import plot_result

        return plot_result(
            self, path, name, image=image, row=row, kind=kind, size=size, title=title
        )


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


def _single_chunk(data: bytes, chunks_tag: int) -> RawChunk | None:
    """The one TensorChunk of a message that holds nothing else, or None."""
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


def decode_response(data: bytes) -> pb.AnalyzeResponse | RawChunk:
    """The response deserializer: 1 MiB chunk messages skip protobuf's copy of their data."""
    return _single_chunk(data, 0x12) or pb.AnalyzeResponse.FromString(data)


class Assembler:
    """Feeds an Analyze stream's messages in order into preallocated arrays (via Frames).

    `result()` returns only a complete result: a header, every byte of every tensor, and
    the summary. Anything else raises GradtapError(DATA_LOSS).
    """

    def __init__(self, model: str, region: SharedRegion | None = None) -> None:
        self._model = model
        self._frames = Frames(region)
        self._summary: pb.AnalyzeSummary | None = None

    def feed(self, message: pb.AnalyzeResponse | RawChunk) -> None:
        if isinstance(message, RawChunk):
            self._frames.feed(None, [message])
            return
        header = message.header if message.HasField("header") else None
        if header is None and self._frames.headers is None:
            raise broken("the stream did not start with a header")
        self._frames.feed(header, message.chunks)
        if message.HasField("summary"):
            self._frames.finish(message.summary.tensor_count)
            self._summary = message.summary

    def result(self) -> Result:
        """The complete result; GradtapError(DATA_LOSS) if the stream was cut short."""
        headers = self._frames.headers
        if self._summary is None or headers is None:
            raise broken("the stream ended before its summary; the result is incomplete")
        s = self._summary
        result = Result(
            loss=s.loss,
            metadata={
                "model": self._model,
                "model_digest": s.model_digest,
                "device": s.device,
                "torch_version": s.torch_version,
                "replica": s.replica,
                "batch_size": s.batch_size,
                "precision": s.precision,
                "timings": {
                    "decode_ms": s.timings.decode_ms,
                    "forward_ms": s.timings.forward_ms,
                    "backward_ms": s.timings.backward_ms,
                    "collect_ms": s.timings.collect_ms,
                    "total_ms": s.timings.total_ms,
                },
                "bytes_received": self._frames.received,
                "transport": "shared_memory" if self._frames.in_region else "stream",
            },
        )
        outputs: dict[int, np.ndarray] = {}
        for h, array in zip(headers, self._frames.arrays):
            if h.role == pb.TENSOR_ROLE_GRADIENT:
                result.gradients[h.name] = array
            elif h.role == pb.TENSOR_ROLE_ACTIVATION:
                result.activations[h.name] = array
            elif h.role == pb.TENSOR_ROLE_INPUT_GRADIENT:
                result.input_grads[h.index] = array
            elif h.role == pb.TENSOR_ROLE_OUTPUT:
                outputs[h.index] = array
            elif h.role == pb.TENSOR_ROLE_PARAMETER_GRADIENT:
                result.param_grads[h.name] = array
            elif h.role == pb.TENSOR_ROLE_TOPK_INDICES:
                result.topk_indices[h.name] = array
            if h.HasField("reduction") and h.role != pb.TENSOR_ROLE_TOPK_INDICES:
                result.reductions[h.name] = reduction(h)
        result.outputs = [outputs[i] for i in sorted(outputs)]
        return result

    def tensors(self) -> list[tuple[pb.TensorHeader, np.ndarray]]:
        """Every tensor of the complete stream with its header, in header order."""
        self.result()
        assert self._frames.headers is not None
        return list(zip(self._frames.headers, self._frames.arrays))


@dataclass(frozen=True)
class ModelInfo:
    """A served model: its name, content digest and where it came from."""

    name: str
    digest: str
    source: str


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's dtype and shape; None marks a dynamic dimension."""

    dtype: str
    shape: tuple[int | None, ...]
    min_shape: tuple[int, ...] = ()
    max_shape: tuple[int | None, ...] = ()


@dataclass(frozen=True)
class Node:
    """A targetable node of the model's exported graph."""

    name: str
    op: str
    dtype: str
    shape: tuple[int | None, ...]
    differentiable: bool


@dataclass(frozen=True)
class ModelDescription:
    """What DescribeModel says: inputs, outputs, nodes, modules and parameters."""

    name: str
    digest: str
    source: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    nodes: list[Node]
    modules: dict[str, str]
    """module path -> the node producing its output."""
    parameters: list[str]


def _spec(s: pb.TensorSpec) -> TensorSpec:
    return TensorSpec(
        dtype=DTYPE_NAMES.get(s.dtype, "unknown"),
        shape=tuple(d if d >= 0 else None for d in s.shape),
        min_shape=tuple(s.min_shape),
        max_shape=tuple(d if d >= 0 else None for d in s.max_shape),
    )


def model_info(m: pb.ModelSummary) -> ModelInfo:
    return ModelInfo(name=m.name, digest=m.digest, source=m.source)


def description(r: pb.DescribeModelResponse) -> ModelDescription:
    return ModelDescription(
        name=r.model.name,
        digest=r.model.digest,
        source=r.model.source,
        inputs=[_spec(s) for s in r.inputs],
        outputs=[_spec(s) for s in r.outputs],
        nodes=[
            Node(n.name, n.op, _spec(n.spec).dtype, _spec(n.spec).shape, n.differentiable)
            for n in r.nodes
        ],
        modules={m.path: m.node for m in r.modules},
        parameters=list(r.parameters),
    )
