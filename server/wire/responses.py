"""Responses onto the wire: model listings, and every RPC's result stream and summary.

Result streams are framed alike (wire/frames.py): a header, chunks of at most 1 MiB, a
summary; Attribute's tensor has the role ATTRIBUTION and Perturb's ADVERSARIAL, and Perturb
sends one progress message per step before its result. The summaries' decode_ms and total_ms
are set here and only here; the engine sets its own timings (forward, backward, collect).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

from gradtap.v1 import gradtap_pb2 as pb

from ..engine.adversarial import Perturbed, Step
from ..engine.aggregate import Aggregator
from ..engine.analysis import Collected, Outcome, Role
from ..engine.attribution import CAPTUM_VERSION, Attributed
from ..models.model import Model, Spec
from ..models.registry import Registry
from ..models.text import Tokenized
from ..models.versions import ModelStatus, State, VersionStatus
from . import shm
from .frames import frames, header, on_host
from .names import WIRE_DTYPES
from .text import token_rows

T = TypeVar("T")


def _ms_since(t: float) -> float:
    return (time.perf_counter() - t) * 1e3


# -- ListModels and DescribeModel -------------------------------------------------------------


def model_list(registry: Registry) -> pb.ListModelsResponse:
    """Every model, with every version, failed ones included."""
    return pb.ListModelsResponse(models=[model_summary(s) for s in registry.statuses()])


MODEL_STATES = {
    State.LOADING: pb.MODEL_STATE_LOADING,
    State.READY: pb.MODEL_STATE_READY,
    State.FAILED: pb.MODEL_STATE_FAILED,
    State.UNLOADING: pb.MODEL_STATE_UNLOADING,
}


def version_info(v: VersionStatus) -> pb.ModelVersionInfo:
    """One version, its state and (for a failure) its reason."""
    return pb.ModelVersionInfo(
        version=v.version,
        digest=v.digest,
        state=MODEL_STATES[v.state],
        reason=v.reason,
        source=v.source,
    )


def model_summary(status: ModelStatus) -> pb.ModelSummary:
    """A model with its versions; digest and source are its default version's."""
    default = status.default
    newest = status.versions[-1] if status.versions else None
    shown = default if default is not None else newest
    return pb.ModelSummary(
        name=status.name,
        digest=default.digest if default is not None else "",
        source=shown.source if shown is not None else "",
        default_version=status.default_version,
        versions=[version_info(v) for v in status.versions],
        state=MODEL_STATES[status.state],
        reason=status.reason,
    )


def description(model: Model, status: ModelStatus | None) -> pb.DescribeModelResponse:
    """A version's inputs, outputs, nodes, modules and parameters, and the model's versions."""
    summary = (
        model_summary(status)
        if status is not None
        else pb.ModelSummary(name=model.name, digest=model.digest, source=model.source)
    )
    return pb.DescribeModelResponse(
        model=summary,
        version=pb.ModelVersionInfo(
            version=model.version,
            digest=model.digest,
            state=pb.MODEL_STATE_READY,
            source=model.source,
        ),
        inputs=[_spec(s) for s in model.inputs],
        outputs=[_spec(s) for s in model.outputs],
        nodes=[
            pb.GraphNode(
                name=n.name,
                op=n.op,
                spec=_spec(n.spec),
                differentiable=n.differentiable,
                note=n.note,
            )
            for n in model.nodes.values()
        ],
        modules=[
            pb.ModuleOutput(path=path, type=mtype, node=node, calls=_calls(model, path))
            for path, (mtype, node) in model.modules.items()
        ],
        parameters=[name for name, _, is_param in model.state if is_param],
        has_tokenizer=model.tokenizer is not None,
    )


def _calls(model: Model, path: str) -> list[str]:
    """The node of each call of a module called more than once; empty otherwise."""
    calls = model.module_calls.get(path, [])
    return calls if len(calls) > 1 else []


def _spec(spec: Spec) -> pb.TensorSpec:
    return pb.TensorSpec(
        dtype=WIRE_DTYPES.get(spec.dtype, pb.DTYPE_UNSPECIFIED),
        shape=[d.size if d.size is not None else -1 for d in spec.dims],
        dims=[d.name or d.symbol if d.size is None else "" for d in spec.dims],
        min_shape=[d.size if d.size is not None else d.min for d in spec.dims],
        max_shape=[
            d.size if d.size is not None else (d.max if d.max is not None else -1)
            for d in spec.dims
        ],
        name=spec.name,
        high=spec.high or 0,
    )


# -- Analyze and AnalyzeMany ------------------------------------------------------------------


def analyze_summary(
    outcome: Outcome, model: Model, replica: str, started: float, decoded: float
) -> pb.AnalyzeSummary:
    """The summary of a finished analysis: the call arrived at `started` and was decoded by
    `decoded` (time.perf_counter()); its result is ready now."""
    return pb.AnalyzeSummary(
        loss=outcome.loss,
        model_digest=model.digest,
        device=outcome.device,
        timings=pb.Timings(
            decode_ms=(decoded - started) * 1e3, total_ms=_ms_since(started), **outcome.timings
        ),
        torch_version=torch.__version__,
        replica=replica,
        tensor_count=len(outcome.tensors),
        batch_size=outcome.batch_size,
        precision=outcome.precision,
        model_version=model.version,
    )


def analyze_stream(
    outcome: Outcome, summary: pb.AnalyzeSummary, tokenized: Tokenized | None = None
) -> Iterator[pb.AnalyzeResponse | bytes]:
    """The Analyze stream of a result: header (with the tokens made of a request's texts),
    chunks, summary."""
    first = pb.AnalyzeResponse(header=header(outcome.tensors))
    first.header.tokens.extend(token_rows(tokenized))
    return frames(outcome.tensors, first, summary)


def written(
    outcome: Outcome,
    region: shm.Region,
    summary: pb.AnalyzeSummary,
    tokenized: Tokenized | None = None,
) -> pb.AnalyzeResponse:
    """Writes a result's tensors into the caller's region; the one message that says where."""
    result = header(outcome.tensors)
    result.tokens.extend(token_rows(tokenized))
    offsets = region.write(list(on_host([c.tensor for c in outcome.tensors])))
    result.shared_memory = True
    for tensor, offset in zip(result.tensors, offsets):
        tensor.region_offset = offset
    return pb.AnalyzeResponse(header=result, summary=summary)


def many_item(
    index: int,
    outcome: Outcome,
    model: Model,
    replica: str,
    started: float,
    decoded: float,
    omit: bool,
) -> Iterator[pb.AnalyzeManyResponse | bytes]:
    """One item's messages of an AnalyzeMany stream; only its summary when `omit`."""
    tensors = [] if omit else outcome.tensors
    summary = analyze_summary(outcome, model, replica, started, decoded)
    summary.tensor_count = len(tensors)
    first = pb.AnalyzeManyResponse(index=index, header=header(tensors))
    return _indexed(frames(tensors, first, summary), index)


def many_aggregate(
    aggregator: Aggregator,
    model: Model,
    replica: str,
    device: str,
    precision: str,
    started: float,
) -> Iterator[pb.AnalyzeManyResponse | bytes]:
    """The aggregate's messages, after the last item; the stream began at `started`."""
    tensors = aggregator.collected()
    summary = pb.AnalyzeSummary(
        loss=aggregator.loss,
        model_digest=model.digest,
        device=device,
        timings=pb.Timings(total_ms=_ms_since(started)),
        torch_version=torch.__version__,
        replica=replica,
        tensor_count=len(tensors),
        batch_size=1,
        precision=precision,
        model_version=model.version,
    )
    first = pb.AnalyzeManyResponse(
        index=aggregator.items,
        header=header(tensors),
        aggregate=pb.AggregateInfo(items=aggregator.items, rows=aggregator.rows),
    )
    return _indexed(frames(tensors, first, summary), aggregator.items)


def _indexed(messages: Iterable[T], index: int) -> Iterator[T]:
    """Tags an item's response messages with its index; pre-encoded chunks pass as they are."""
    for message in messages:
        if isinstance(message, pb.AnalyzeManyResponse):
            message.index = index
        yield message


# -- Attribute and Perturb --------------------------------------------------------------------


def _single(role: Role, index: int, tensor: torch.Tensor) -> list[Collected]:
    return [Collected(role, "", index, tensor)]


def attribute_stream(
    outcome: Attributed, model: Model, replica: str, started: float
) -> Iterator[pb.AttributeResponse | bytes]:
    """The Attribute stream for a finished attribution; the call arrived at `started`."""
    summary = pb.AttributeSummary(
        model_digest=model.digest,
        device=outcome.device,
        torch_version=torch.__version__,
        captum_version=CAPTUM_VERSION,
        replica=replica,
        tensor_count=1,
        seed=outcome.seed,
        internal_batch_size=outcome.internal_batch_size,
        compute_ms=outcome.compute_ms,
        total_ms=_ms_since(started),
        model_version=model.version,
    )
    tensors = _single(Role.ATTRIBUTION, outcome.index, outcome.tensor)
    first = pb.AttributeResponse(header=header(tensors))
    return frames(tensors, first, summary)


def perturb_stream(
    events: Iterable[Step | Perturbed], model: Model, replica: str, started: float
) -> Iterator[pb.PerturbResponse | bytes]:
    """The Perturb stream: a progress message per step as the loop runs, then the result."""
    for event in events:
        if isinstance(event, Step):
            yield pb.PerturbResponse(progress=pb.PerturbProgress(step=event.step, loss=event.loss))
        else:
            yield from _perturb_result(event, model, replica, started)


def _perturb_result(
    result: Perturbed, model: Model, replica: str, started: float
) -> Iterator[pb.PerturbResponse | bytes]:
    summary = pb.PerturbSummary(
        objective_before=result.objective_before,
        objective_after=result.objective_after,
        losses=result.losses,
        model_digest=model.digest,
        device=result.device,
        torch_version=torch.__version__,
        replica=replica,
        tensor_count=1,
        seed=result.seed,
        total_ms=_ms_since(started),
        model_version=model.version,
    )
    tensors = _single(Role.ADVERSARIAL, result.index, result.adversarial)
    first = pb.PerturbResponse(header=header(tensors))
    return frames(tensors, first, summary)
