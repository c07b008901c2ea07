"""Responses into results: one assembler per call, fed the call's messages in order.

An assembler's `result()` returns only a complete result: a header, every byte of every
tensor and the summary (see _frames.py). Anything else raises GradtapError(DATA_LOSS).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
from grpc_health.v1 import health_pb2

from gradtap.v1 import gradtap_pb2 as pb

from ._frames import Frames, RawChunk, broken, single_chunk
from ._legacy import PerturbMetadata
from ._result import (
    Aggregate,
    AttributionResult,
    ModelDescription,
    ModelInfo,
    ModelVersion,
    Node,
    PerturbResult,
    Result,
    TensorSpec,
    TokenAttributionResult,
)
from ._shm import SharedRegion
from ._target import REDUCE_NAMES, Reduction, Target, TargetLike
from ._tensor import DTYPE_NAMES

T = TypeVar("T")
Step = tuple[int, float]
"""(step, loss): the progress of an adversarial loop."""

_STATES = {
    value: name.removeprefix("MODEL_STATE_") for name, value in pb.ModelState.items() if value
}
"""ModelState values by their names without the prefix: "READY", "FAILED", ..."""

_MANY_CHUNKS_TAG = (pb.AnalyzeManyResponse.DESCRIPTOR.fields_by_name["chunks"].number << 3) | 2
_CHUNKS_TAG = (pb.AnalyzeResponse.DESCRIPTOR.fields_by_name["chunks"].number << 3) | 2


def decode_response(data: bytes) -> pb.AnalyzeResponse | RawChunk:
    """Analyze's response deserializer: 1 MiB chunk messages skip protobuf's copy."""
    return single_chunk(data, _CHUNKS_TAG) or pb.AnalyzeResponse.FromString(data)


def decode_many_response(data: bytes) -> pb.AnalyzeManyResponse | RawChunk:
    """AnalyzeMany's response deserializer: 1 MiB chunk messages skip protobuf's copy."""
    return single_chunk(data, _MANY_CHUNKS_TAG) or pb.AnalyzeManyResponse.FromString(data)


def _served(summary: Any) -> dict[str, Any]:
    """The metadata every result carries from its summary: which version of the model
    computed it, where, with which torch, on which replica."""
    return {
        "model_version": summary.model_version,
        "model_digest": summary.model_digest,
        "device": summary.device,
        "torch_version": summary.torch_version,
        "replica": summary.replica,
    }


class Reply(Generic[T]):
    """The assembler of a call with one response message: `convert` makes the result."""

    def __init__(self, convert: Callable[[Any], T]) -> None:
        self._convert = convert
        self._response: Any = None

    def feed(self, message: Any) -> None:
        self._response = message

    def result(self) -> T:
        return self._convert(self._response)


def _spec(s: pb.TensorSpec) -> TensorSpec:
    return TensorSpec(
        dtype=DTYPE_NAMES.get(s.dtype, "unknown"),
        shape=tuple(d if d >= 0 else None for d in s.shape),
        min_shape=tuple(s.min_shape),
        max_shape=tuple(d if d >= 0 else None for d in s.max_shape),
        name=s.name,
        dims=tuple(s.dims),
        high=s.high or None,
    )


def model_version(v: pb.ModelVersionInfo) -> ModelVersion:
    return ModelVersion(
        version=v.version,
        digest=v.digest,
        state=_STATES.get(v.state, "UNSPECIFIED"),
        reason=v.reason,
        source=v.source,
    )


def model_info(m: pb.ModelSummary) -> ModelInfo:
    return ModelInfo(
        name=m.name,
        digest=m.digest,
        source=m.source,
        default_version=m.default_version,
        versions=tuple(model_version(v) for v in m.versions),
        state=_STATES.get(m.state, "UNSPECIFIED"),
        reason=m.reason,
    )


def model_infos(r: pb.ListModelsResponse) -> list[ModelInfo]:
    return [model_info(m) for m in r.models]


def description(r: pb.DescribeModelResponse) -> ModelDescription:
    return ModelDescription(
        name=r.model.name,
        digest=r.model.digest,
        source=r.model.source,
        inputs=[_spec(s) for s in r.inputs],
        outputs=[_spec(s) for s in r.outputs],
        nodes=[
            Node(
                n.name,
                n.op,
                _spec(n.spec).dtype,
                _spec(n.spec).shape,
                n.differentiable,
                n.note,
                tuple(n.spec.dims),
            )
            for n in r.nodes
        ],
        modules={m.path: m.node for m in r.modules},
        parameters=list(r.parameters),
        version=r.version.version,
        default_version=r.model.default_version,
        versions=tuple(model_version(v) for v in r.model.versions),
        calls={m.path: list(m.calls) for m in r.modules if m.calls},
        has_tokenizer=r.has_tokenizer,
    )


def serving_status(r: health_pb2.HealthCheckResponse) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))


def _reduction(header: pb.TensorHeader) -> Reduction:
    r = header.reduction
    return Reduction(
        reduce=REDUCE_NAMES.get(r.reduce),
        dims=tuple(r.dims),
        topk=r.topk or None,
        dtype=DTYPE_NAMES.get(header.dtype, "unknown"),
        reduced_shape=tuple(header.reduced_shape),
    )


def _as_float32(result: Result, targets: Sequence[TargetLike]) -> Result:
    """Converts, in place, the arrays of targets that asked for float32 on arrival."""
    for t in targets:
        if isinstance(t, Target) and t.as_float32:
            kinds = {"gradient": [result.gradients], "activation": [result.activations]}
            for arrays in kinds.get(t.capture or "", [result.gradients, result.activations]):
                if t.name in arrays:
                    arrays[t.name] = arrays[t.name].astype(np.float32)
    return result


class AnalysisAssembler:
    """Feeds an Analyze stream's messages (or one AnalyzeMany item's) into preallocated
    arrays, in a shared-memory region when the server wrote the result there."""

    def __init__(
        self, model: str, targets: Sequence[TargetLike] = (), region: SharedRegion | None = None
    ) -> None:
        self._model = model
        self._targets = targets
        self._frames = Frames(region)
        self._summary: pb.AnalyzeSummary | None = None
        self._tokens: list[pb.TokenRow] = []

    def feed(self, message: pb.AnalyzeResponse | RawChunk) -> None:
        if isinstance(message, RawChunk):
            self._frames.feed(None, [message])
            return
        header = message.header if message.HasField("header") else None
        if header is None and self._frames.headers is None:
            raise broken("the stream did not start with a header")
        if header is not None:
            self._tokens = list(header.tokens)
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
                **_served(s),
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
        roles = {
            pb.TENSOR_ROLE_GRADIENT: result.gradients,
            pb.TENSOR_ROLE_ACTIVATION: result.activations,
            pb.TENSOR_ROLE_PARAMETER_GRADIENT: result.param_grads,
            pb.TENSOR_ROLE_TOPK_INDICES: result.topk_indices,
            pb.TENSOR_ROLE_ATTRIBUTION_PATCHING: result.patching,
        }
        outputs: dict[int, np.ndarray] = {}
        for h, array in zip(headers, self._frames.arrays):
            if h.role in roles:
                roles[h.role][h.name] = array
            elif h.role == pb.TENSOR_ROLE_INPUT_GRADIENT:
                result.input_grads[h.index] = array
            elif h.role == pb.TENSOR_ROLE_OUTPUT:
                outputs[h.index] = array
            if h.HasField("reduction") and h.role != pb.TENSOR_ROLE_TOPK_INDICES:
                result.reductions[h.name] = _reduction(h)
        result.outputs = [outputs[i] for i in sorted(outputs)]
        if self._tokens:
            result.tokens = [list(row.tokens) for row in self._tokens]
            result.token_ids = np.array([list(row.ids) for row in self._tokens], np.int64)
            result.attention_mask = np.array(
                [list(row.attention_mask) for row in self._tokens], np.int64
            )
        return _as_float32(result, self._targets)

    def tensors(self) -> list[tuple[pb.TensorHeader, np.ndarray]]:
        """Every tensor of the complete stream with its header, in header order."""
        self.result()
        assert self._frames.headers is not None
        return list(zip(self._frames.headers, self._frames.arrays))


class _OneTensor:
    """What the Attribute and Perturb assemblers share: one framed tensor, then a summary."""

    def __init__(self) -> None:
        self._frames = Frames()

    def _feed(
        self, message: pb.AttributeResponse | pb.PerturbResponse | pb.AttributeTokensResponse
    ) -> Any:
        """Feeds one result message; returns its summary, when it holds one."""
        self._frames.feed(message.header if message.HasField("header") else None, message.chunks)
        if not message.HasField("summary"):
            return None
        self._frames.finish(message.summary.tensor_count)
        return message.summary

    def _tensor(self, summary: object) -> np.ndarray:
        if summary is None:
            raise broken("the stream ended before its summary; the result is incomplete")
        if len(self._frames.arrays) != 1:
            raise broken(f"the stream sent {len(self._frames.arrays)} tensors instead of one")
        return self._frames.arrays[0]


class AttributionAssembler(_OneTensor):
    """Feeds Attribute stream messages in order; `result()` is the complete attribution."""

    def __init__(self, model: str, method: str, node: str | None) -> None:
        super().__init__()
        self._about = {"model": model, "method": method, "node": node}
        self._summary: pb.AttributeSummary | None = None

    def feed(self, message: pb.AttributeResponse) -> None:
        self._summary = self._feed(message) or self._summary

    def result(self) -> AttributionResult:
        """The complete attribution; GradtapError(DATA_LOSS) if the stream was cut short."""
        attribution = self._tensor(self._summary)
        s = self._summary
        assert s is not None
        return AttributionResult(
            attribution,
            {
                **self._about,
                **_served(s),
                "captum_version": s.captum_version,
                "seed": s.seed,
                "internal_batch_size": s.internal_batch_size,
                "timings": {"compute_ms": s.compute_ms, "total_ms": s.total_ms},
            },
        )


class TokenAttributionAssembler(_OneTensor):
    """Feeds AttributeTokens stream messages in order; `result()` is the complete result."""

    def __init__(
        self,
        about: dict[str, Any],
        prompt: np.ndarray | None,
        continuation: np.ndarray | None,
        continuation_text: bool = False,
    ) -> None:
        """`prompt` is None for a prompt sent as text; `continuation_text` says the
        continuation was sent as text: the summary then holds their ids."""
        super().__init__()
        self._about = about
        self._tokens = (prompt, continuation)
        self._continuation_text = continuation_text
        self._summary: pb.AttributeTokensSummary | None = None

    def feed(self, message: pb.AttributeTokensResponse) -> None:
        self._summary = self._feed(message) or self._summary

    def result(self) -> TokenAttributionResult:
        """The complete result; GradtapError(DATA_LOSS) if the stream was cut short."""
        scores = self._tensor(self._summary)
        s = self._summary
        assert s is not None
        prompt, continuation = self._tokens
        if prompt is None:  # sent as text: the ids the server made
            prompt = np.array(s.prompt_ids, np.int64)
        if self._continuation_text:
            continuation = np.array(s.continuation_ids, np.int64)
        return TokenAttributionResult(
            scores=scores,
            values=list(s.values),
            prompt=prompt,
            continuation=continuation,
            prompt_tokens=list(s.prompt_tokens),
            continuation_tokens=list(s.continuation_tokens),
            metadata={
                **self._about,
                "node": s.node,
                **_served(s),
                "captum_version": s.captum_version,
                "passes": s.passes,
                "internal_batch_size": s.internal_batch_size,
                "timings": {"compute_ms": s.compute_ms, "total_ms": s.total_ms},
            },
        )


class PerturbAssembler(_OneTensor):
    """Feeds Perturb stream messages in order; progress first, then the framed result."""

    def __init__(self, model: str, method: str) -> None:
        super().__init__()
        self._about = {"model": model, "method": method}
        self._steps: list[float] = []
        self._summary: pb.PerturbSummary | None = None

    def feed(self, message: pb.PerturbResponse) -> Step | None:
        """Takes one message; returns (step, loss) when it reports a step."""
        if message.HasField("progress"):
            if self._frames.headers is not None or self._summary is not None:
                raise broken("the stream sent progress after its result began")
            step = message.progress
            if step.step != len(self._steps):
                raise broken(f"progress for step {step.step} arrived out of order")
            self._steps.append(step.loss)
            return step.step, step.loss
        self._summary = self._feed(message) or self._summary
        return None

    def result(self) -> PerturbResult:
        """The complete result; GradtapError(DATA_LOSS) if the stream was cut short."""
        adversarial = self._tensor(self._summary)
        s = self._summary
        assert s is not None
        return PerturbResult(
            adversarial=adversarial,
            losses=list(s.losses),
            objective_before=s.objective_before,
            objective_after=s.objective_after,
            metadata=PerturbMetadata(
                {
                    **self._about,
                    **_served(s),
                    "seed": s.seed,
                    "timings": {"total_ms": s.total_ms},
                }
            ),
        )


class ManyAssembler:
    """Routes AnalyzeMany messages: each item's messages to its own AnalysisAssembler, in
    order, then the aggregate's."""

    def __init__(self, model: str, targets: Sequence[TargetLike]) -> None:
        self._model = model
        self._targets = targets
        self._current: AnalysisAssembler | None = None
        self._current_is_aggregate = False
        self._info: pb.AggregateInfo | None = None
        self._aggregate: Aggregate | None = None
        self.answered = 0

    def feed(self, message: pb.AnalyzeManyResponse | RawChunk) -> Result | None:
        """Takes the next message; returns an item's Result when its summary arrived."""
        if self._aggregate is not None:
            raise broken("the stream went on after its aggregate")
        if isinstance(message, RawChunk):
            if self._current is None:
                raise broken("chunks arrived outside an item")
            self._current.feed(message)
            return None
        if message.HasField("header"):
            if self._current is not None:
                raise broken("a header arrived before the previous item's summary")
            self._current_is_aggregate = message.HasField("aggregate")
            if self._current_is_aggregate:
                self._info = message.aggregate
            elif message.index != self.answered:
                raise broken(f"item {message.index} arrived where {self.answered} was due")
            self._current = AnalysisAssembler(self._model, self._targets)
        elif self._current is None:
            raise broken("a message arrived outside an item")
        part = pb.AnalyzeResponse(chunks=message.chunks)
        if message.HasField("header"):
            part.header.CopyFrom(message.header)
        if message.HasField("summary"):
            part.summary.CopyFrom(message.summary)
        self._current.feed(part)
        if not message.HasField("summary"):
            return None
        done, self._current = self._current, None
        if self._current_is_aggregate:
            self._aggregate = self._build_aggregate(done)
            return None
        result = done.result()
        result.metadata["item"] = self.answered
        self.answered += 1
        return result

    def _build_aggregate(self, done: AnalysisAssembler) -> Aggregate:
        assert self._info is not None
        summary = done.result()
        aggregate = Aggregate(
            items=self._info.items,
            rows=self._info.rows,
            loss=summary.loss,
            metadata=summary.metadata,
        )
        for header, array in done.tensors():
            if header.role == pb.TENSOR_ROLE_MEAN_GRADIENT:
                aggregate.mean_gradients[header.name] = array
            elif header.role == pb.TENSOR_ROLE_MEAN_ABS_GRADIENT:
                aggregate.mean_abs_gradients[header.name] = array
        return aggregate

    def finish(self, sent: int, aggregate: bool) -> Aggregate | None:
        """Checks, at the stream's end, that every item and the aggregate came back whole."""
        if self._current is not None:
            raise broken("the stream ended inside an item; the result is incomplete")
        if self.answered != sent:
            raise broken(f"the stream ended after {self.answered} of {sent} items")
        if aggregate and sent and self._aggregate is None:
            raise broken("the stream ended without its aggregate")
        return self._aggregate
