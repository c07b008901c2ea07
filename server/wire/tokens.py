"""AttributeTokens on the wire: the request checked and decoded, the result framed like others."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gradtap.v1 import gradtap_pb2 as pb

from ..engine.analysis import Collected, Role
from ..engine.attribution import CAPTUM_VERSION
from ..engine.tokens import TokenAttribution, TokensAttributed
from ..errors import InvalidArgument
from ..models.model import Model
from ..models.text import Tokenized, encode
from . import names
from .frames import frames, header
from .requests import Limits, objective_copied, objective_of
from .tensors import copied, declared


@dataclass(frozen=True)
class Texts:
    """The prompt and continuation of a request that sent them as text, tokenized."""

    prompt: Tokenized | None = None
    continuation: Tokenized | None = None


def texts(request: pb.AttributeTokensRequest, served: Model) -> Texts:
    """The request's prompt_text and continuation_text tokenized: the prompt with the
    tokenizer's special tokens, the continuation without (it continues the prompt)."""
    for name in ("prompt", "continuation"):
        if getattr(request, f"{name}_text") and request.HasField(name):
            raise InvalidArgument(
                f"give {name} or {name}_text, not both",
                reason="IDS_AND_TEXT",
                field=f"{name}_text",
            )
    prompt = encode(served, request.prompt_text, "prompt_text") if request.prompt_text else None
    continuation = None
    if request.continuation_text:
        continuation = encode(
            served, request.continuation_text, "continuation_text", special_tokens=False
        )
    return Texts(prompt, continuation)


def attribution(
    request: pb.AttributeTokensRequest, served: Model, limits: Limits, given: Texts = Texts()
) -> TokenAttribution:
    """Checks and decodes an AttributeTokens request (its texts tokenized in `given`); the
    engine checks it against the model."""
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
    if given.prompt is not None:
        prompt = given.prompt.ids[0]
    elif request.HasField("prompt"):
        prompt = declared(request.prompt, "prompt", limits.max_tensor_elements)
        prompt = copied(request.prompt, prompt)
    else:
        raise InvalidArgument(
            "prompt (or prompt_text) is required", reason="WRONG_SHAPE", field="prompt"
        )
    continuation = None
    if given.continuation is not None:
        continuation = given.continuation.ids[0]
    elif request.HasField("continuation"):
        continuation = declared(request.continuation, "continuation", limits.max_tensor_elements)
        continuation = copied(request.continuation, continuation)
    objective = None
    if request.HasField("objective"):
        decoded = objective_of(request.objective, limits, served)
        objective = objective_copied(request.objective, decoded)
    return TokenAttribution(
        prompt=prompt,
        continuation=(
            None
            if continuation is None or continuation.numel() == 0 and continuation.dim() == 1
            else continuation
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
    outcome: TokensAttributed, model: Model, replica: str, started: float, given: Texts = Texts()
) -> Iterator[pb.AttributeTokensResponse | bytes]:
    """The AttributeTokens stream for a finished attribution; the call arrived at `started`.
    The tokens of a prompt or continuation sent as text come back in the summary."""
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
    if given.prompt is not None:
        summary.prompt_tokens.extend(given.prompt.tokens[0])
        summary.prompt_ids.extend(given.prompt.ids[0].tolist())
    if given.continuation is not None:
        summary.continuation_tokens.extend(given.continuation.tokens[0])
        summary.continuation_ids.extend(given.continuation.ids[0].tolist())
    tensors = [Collected(Role.ATTRIBUTION, "", 0, outcome.scores)]
    first = pb.AttributeTokensResponse(header=header(tensors))
    return frames(tensors, first, summary)
