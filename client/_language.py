"""The calls for language models, each written once as in _calls.py: attribute_tokens and
attribution_patching. docs/language-models.md shows each beside the code it replaces."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gradtap.v1 import gradtap_pb2 as pb

from . import _legacy as legacy
from ._assemble import AnalysisAssembler, TokenAttributionAssembler, decode_response
from ._exchange import Call, Method
from ._objective import Objective
from ._request import (
    INTEGRATION_METHODS,
    analyze_request,
    arrays,
    choice,
    model_ref,
    objective_or_none,
)
from ._result import Result, TokenAttributionResult
from ._target import REDUCES, Target, TargetLike, Targets, as_targets
from ._tensor import encode

_SERVICE = "/gradtap.v1.GradientService/"
ANALYZE = Method(
    _SERVICE + "Analyze", "unary_stream", pb.AnalyzeRequest.SerializeToString, decode_response
)
ATTRIBUTE_TOKENS = Method(
    _SERVICE + "AttributeTokens",
    "unary_stream",
    pb.AttributeTokensRequest.SerializeToString,
    pb.AttributeTokensResponse.FromString,
)

TOKEN_METHODS: dict[str, pb.AttributionMethod.ValueType] = {
    "saliency": pb.ATTRIBUTION_METHOD_SALIENCY,
    "input_x_gradient": pb.ATTRIBUTION_METHOD_INPUT_X_GRADIENT,
    "integrated_gradients": pb.ATTRIBUTION_METHOD_INTEGRATED_GRADIENTS,
}
"""attribute_tokens' methods: Captum's LLMGradientAttribution over LayerGradientXActivation
(saliency without, input_x_gradient with multiply_by_inputs) and LayerIntegratedGradients."""

AGGREGATES: dict[str, pb.TokenAggregate.ValueType] = {
    "sum": pb.TOKEN_AGGREGATE_SUM,
    "l2": pb.TOKEN_AGGREGATE_L2,
}


def _token_ids(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]  # a tokenizer's (1, n) batch of one
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D array of token ids")
    return array.astype(np.int64, copy=False)


@legacy.accepts(legacy.renamed("attribute_tokens", layer="node"))
def attribute_tokens(
    model: str,
    prompt: Any,
    continuation: Any = None,
    *,
    method: str = "integrated_gradients",
    node: str | None = None,
    aggregate: str = "sum",
    objective: Objective | None = None,
    n_steps: int | None = None,
    integration_method: str | None = None,
    baseline_token: int | None = None,
    internal_batch_size: int | None = None,
    digest: str | None = None,
    timeout: float | None = None,
) -> Call[TokenAttributionResult]:
    """Attributes the log-probability of each continuation token (given the prompt and the
    continuation tokens before it) to each prompt token, as Captum's LLMGradientAttribution;
    without a continuation, an objective (e.g. of an encoder's output) to each token.

    Args:
        model: the model's name; its token-id input gets prompt + continuation, an input
            named attention_mask gets ones, token_type_ids zeros, position_ids 0 ... L-1.
        prompt: token ids, shape (P,) (or a tokenizer's (1, P)); or a str, text the server
            tokenizes with its tokenizer's special tokens (describe().has_tokenizer).
        continuation: token ids, shape (K,), at most 512; None to attribute `objective`;
            or a str, text the server tokenizes without special tokens.
        method: "saliency" (the gradient), "input_x_gradient" or "integrated_gradients".
        node: where the attribution is taken, a node shaped (N, S, ...); by default the
            token embedding, found in the graph. `layer=` is its deprecated name.
        aggregate: "sum" over the node's hidden dimensions (Captum's), or "l2", their L2
            norm. Summed gradients of a LayerNorm model are about 0: use "l2" for saliency.
        objective: without a continuation, the scalar attributed (any Objective).
        n_steps: integration steps (integrated gradients), at most 512; 50 by default.
        integration_method: Captum's integration rule; gausslegendre by default.
        baseline_token: the token id every prompt position takes at the baseline
            (integrated gradients); 0 by default, as Captum's TextTokenInput.
        internal_batch_size: rows per forward pass; the server chooses by default.
        digest: fail unless the served model has this digest.
        timeout: deadline in seconds for this call.

    Returns:
        A TokenAttributionResult: `.scores` shaped (continuation tokens, prompt tokens), or
        (1, prompt tokens) for an objective; `.values`, each continuation token's
        log-probability (or the objective's value); `.prompt`, `.continuation` (ids),
        `.prompt_tokens`, `.continuation_tokens` (strings, for text) and `.metadata`.

    Raises:
        GradtapError: INVALID_ARGUMENT naming the field (continuation, n_steps, node, ...),
            NOT_FOUND, UNAVAILABLE, ...
        TypeError, ValueError: an argument the client cannot send; nothing was sent.
    """
    message = pb.AttributeTokensRequest(
        model=model_ref(model, digest),
        method=choice(TOKEN_METHODS, method, "method"),
        node=node or "",
        aggregate=choice(AGGREGATES, aggregate, "aggregate"),
    )
    prompt_ids = None
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt text is empty")
        message.prompt_text = prompt
    else:
        prompt_ids = _token_ids(prompt, "prompt")
        message.prompt.CopyFrom(encode(prompt_ids))
    continuation_ids = None
    if isinstance(continuation, str):
        if not continuation:
            raise ValueError("continuation text is empty")
        message.continuation_text = continuation
    elif continuation is not None:
        continuation_ids = _token_ids(continuation, "continuation")
        message.continuation.CopyFrom(encode(continuation_ids))
    if objective_or_none(objective) is not None:
        assert objective is not None
        message.objective.CopyFrom(objective.message)
    if n_steps is not None:
        message.n_steps = int(n_steps)
    if integration_method is not None:
        message.integration_method = choice(
            INTEGRATION_METHODS, integration_method, "integration_method"
        )
    if baseline_token is not None:
        message.baseline_token = int(baseline_token)
    if internal_batch_size is not None:
        message.internal_batch_size = int(internal_batch_size)
    about = {"model": model, "method": method, "aggregate": aggregate}
    return Call(
        ATTRIBUTE_TOKENS,
        message,
        lambda _: TokenAttributionAssembler(
            about, prompt_ids, continuation_ids, continuation_text=isinstance(continuation, str)
        ),
        timeout,
        resend=True,
    )


def attribution_patching(
    model: str,
    clean: Any,
    corrupt: Any,
    objective: Objective,
    targets: Targets,
    *,
    reduce_hidden: bool = True,
    outputs: bool = False,
    digest: str | None = None,
    timeout: float | None = None,
) -> Call[Result]:
    """Attribution patching in one request: for each target, (activation at corrupt -
    activation at clean) times the gradient of the objective at clean, the linear estimate
    of what patching the corrupted activation in would do to the metric. Two forward passes
    and one backward pass on the server, however many targets.

    Args:
        model: the model's name.
        clean, corrupt: the clean and corrupted inputs (one array or a list), of equal
            dtypes and shapes.
        objective: the metric, e.g. Objective.logit_diff(correct, wrong).
        targets: nodes (graph names or module paths), or Targets with a reduction.
        reduce_hidden: sum a name's (or a Target without reduce's) product over its last,
            hidden dimension (one value per token); False returns it whole.
        outputs: also return the model's outputs at the clean inputs.
        digest: fail unless the served model has this digest.
        timeout: deadline in seconds for this call.

    Returns:
        A Result whose `.patching` maps each target, keyed as given, to its array; `.loss`
        is the metric at the clean inputs.

    Raises:
        GradtapError: INVALID_ARGUMENT naming the field (corrupt_inputs[0], targets[1]...).
        TypeError, ValueError: an argument the client cannot send; nothing was sent.
    """
    if objective_or_none(objective) is None:
        raise TypeError("attribution_patching needs a metric objective, e.g. Objective.logit_diff")
    wanted = as_targets(targets)
    if not wanted:
        raise ValueError("attribution_patching needs at least one target")
    message = analyze_request(
        model,
        clean,
        (),
        objective,
        input_grads=False,
        activations=False,
        outputs=outputs,
        param_grads=(),
        digest=digest,
        precision="full",
    )
    message.targets.extend(_patching_target(t, reduce_hidden) for t in wanted)
    message.corrupt_inputs.extend(encode(a) for a in arrays(corrupt))
    return Call(
        ANALYZE,
        message,
        lambda region: AnalysisAssembler(model, wanted, region),
        timeout,
        resend=True,
    )


def _patching_target(target: TargetLike, reduce_hidden: bool) -> pb.TargetLayer:
    name = target.name if isinstance(target, Target) else str(target)
    layer = pb.TargetLayer(name=name, capture=pb.CAPTURE_ATTRIBUTION_PATCHING)
    if isinstance(target, Target):
        if target.capture is not None:
            raise ValueError("attribution_patching targets capture the patching estimate only")
        if target.reduce == "gradient_x_activation":
            raise ValueError("reduce gradient_x_activation does not apply to attribution patching")
        if target.reduce is not None or target.topk:
            return target.message(pb.CAPTURE_ATTRIBUTION_PATCHING)
        layer.dtype = target.message(pb.CAPTURE_ATTRIBUTION_PATCHING).dtype
    if reduce_hidden:
        layer.reduction.reduce = REDUCES["sum"]
        layer.reduction.dims.append(-1)
    return layer


__all__: Sequence[str] = ["attribute_tokens", "attribution_patching"]
