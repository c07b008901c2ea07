"""AttributeTokens on the wire: the request checked and decoded, the result framed like others."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from gradtap.v1 import gradtap_pb2 as pb

from ..engine.analysis import Collected, Role
from ..engine.attribution import CAPTUM_VERSION
from ..engine.tokens import TokenAttribution, TokensAttributed
from ..errors import InvalidArgument
from ..models.model import Model
from . import names
from .frames import frames, header
from .requests import Limits, objective_copied, objective_of
from .tensors import copied, declared


def attribution(
    request: pb.AttributeTokensRequest, served: Model, limits: Limits
) -> TokenAttribution:
    """Checks and decodes an AttributeTokens request; the engine checks it against the model."""
    method = names.ATTRIBUTION_METHODS.get(request.method)
    if method is None:
        message = "method is required" if request.method == 0 else "method has an unknown value"
        raise InvalidArgument(message, reason="UNKNOWN_METHOD", field="method")
    aggregate = "sum"
    if request.aggregate != pb.TOKEN_AGGREGATE_UNSPECIFIED:
        found = names.TOKEN_AGGREGATES.get(request.aggregate)
        if found is None:
            raise InvalidArgument(
                f"aggregate has unknown value {request.aggregate}",
                reason="BAD_PARAMETER",
                field="aggregate",
            )
        aggregate = found
    integration = "gausslegendre"
    if request.integration_method != pb.INTEGRATION_METHOD_UNSPECIFIED:
        rule = names.INTEGRATION_METHODS.get(request.integration_method)
        if rule is None:
            raise InvalidArgument(
                f"integration_method has unknown value {request.integration_method}",
                reason="BAD_PARAMETER",
                field="integration_method",
            )
        integration = rule
    if not request.HasField("prompt"):
        raise InvalidArgument("prompt is required", reason="WRONG_SHAPE", field="prompt")
    prompt = declared(request.prompt, "prompt", limits.max_tensor_elements)
    continuation = None
    if request.HasField("continuation"):
        continuation = declared(request.continuation, "continuation", limits.max_tensor_elements)
    objective = None
    if request.HasField("objective"):
        decoded = objective_of(request.objective, limits, served)
        objective = objective_copied(request.objective, decoded)
    return TokenAttribution(
        prompt=copied(request.prompt, prompt),
        continuation=(
            None
            if continuation is None or continuation.numel() == 0 and continuation.dim() == 1
            else copied(request.continuation, continuation)
        ),
        method=method,
        node=request.node,
        aggregate=aggregate,
        n_steps=request.n_steps if request.HasField("n_steps") else None,
        integration_method=integration,
        baseline_token=request.baseline_token if request.HasField("baseline_token") else 0,
        objective=objective,
        internal_batch_size=(
            request.internal_batch_size if request.HasField("internal_batch_size") else None
        ),
    )


def stream(
    outcome: TokensAttributed, model: Model, replica: str, started: float
) -> Iterator[pb.AttributeTokensResponse | bytes]:
    """The AttributeTokens stream for a finished attribution; the call arrived at `started`."""
    summary = pb.AttributeTokensSummary(
        model_digest=model.digest,
        model_version=model.version,
        device=outcome.device,
        torch_version=torch.__version__,
        captum_version=CAPTUM_VERSION,
        replica=replica,
        tensor_count=1,
        node=outcome.node,
        values=outcome.values,
        passes=outcome.passes,
        internal_batch_size=outcome.internal_batch_size,
        compute_ms=outcome.compute_ms,
        total_ms=(time.perf_counter() - started) * 1e3,
    )
    tensors = [Collected(Role.ATTRIBUTION, "", 0, outcome.scores)]
    first = pb.AttributeTokensResponse(header=header(tensors))
    return frames(tensors, first, summary)
