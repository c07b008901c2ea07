"""Token models: which input holds the token ids, how the other inputs are filled, and
where the ids are embedded. Questions token attribution asks of a model."""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from .model import Model

FILLED_INPUTS = ("attention_mask", "token_type_ids", "position_ids")
"""The model inputs, besides the token ids, that the server fills: ones, zeros, 0 ... L-1."""


def _error(message: str, reason: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, field=field)


def token_input(model: Model) -> int:
    """The position of the model's token-id input: the one named input_ids, else its one
    int64 input shaped (N, S). The rest must be inputs the server fills (FILLED_INPUTS)."""
    names = model.input_nodes
    slot = names.index("input_ids") if "input_ids" in names else None
    if slot is None:
        candidates = [
            i
            for i, spec in enumerate(model.inputs)
            if spec.dtype == torch.int64 and len(spec.dims) == 2
        ]
        slot = candidates[0] if len(candidates) == 1 else None
    if slot is None or len(model.inputs[slot].dims) != 2:
        raise _error(
            f"{model.name} has no token-id input (one named input_ids, or one int64 input "
            "shaped (N, S))",
            "NOT_A_TOKEN_MODEL",
            "model.name",
        )
    others = [n for i, n in enumerate(names) if i != slot and n not in FILLED_INPUTS]
    if others:
        raise _error(
            f"{model.name} takes input {others[0]!r}, which attribute_tokens cannot fill: it "
            f"fills the token ids and {', '.join(FILLED_INPUTS)}",
            "NOT_A_TOKEN_MODEL",
            "model.name",
        )
    return slot


def fill(model: Model, slot: int, ids: torch.Tensor) -> list[torch.Tensor]:
    """The model's inputs for token ids (R, L): the ids, and the inputs the server fills."""
    inputs = []
    for i, (name, spec) in enumerate(zip(model.input_nodes, model.inputs)):
        if i == slot:
            inputs.append(ids)
        elif name == "position_ids":
            positions = torch.arange(ids.shape[1], device=ids.device)
            inputs.append(positions.expand_as(ids).to(spec.dtype))
        else:
            maker = torch.ones if name == "attention_mask" else torch.zeros
            inputs.append(maker(ids.shape, dtype=spec.dtype, device=ids.device))
    return inputs


def token_embedding(model: Model, slot: int) -> str | None:
    """The aten.embedding node whose indices are the token ids (through reshapes)."""
    ids = model.input_nodes[slot]
    for node in model.program.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.embedding.default:
            continue
        source = node.args[1]
        for _ in range(8):
            if not isinstance(source, torch.fx.Node) or source.op != "call_function":
                break
            source = source.args[0]
        if isinstance(source, torch.fx.Node) and source.name == ids and node.name in model.nodes:
            return str(node.name)
    return None


def bound(model: Model, slot: int, rows: int, length: int) -> dict[str, int]:
    """The token input's symbols bound to `rows` and `length`."""
    dims = model.inputs[slot].dims
    return {d.symbol: v for d, v in zip(dims, (rows, length)) if d.size is None}


def sequence_range(model: Model, slot: int) -> tuple[int, int | None, str]:
    """The token input's shortest and longest sequence (None: no bound), and the range in
    the user's words ("2 to 64", "16", "2 to any")."""
    dim = model.inputs[slot].dims[1]
    low = dim.size if dim.size is not None else dim.min
    high = dim.size if dim.size is not None else dim.max
    span = f"{low}" if low == high else f"{low} to {high if high is not None else 'any'}"
    return low, high, span


def check_length(model: Model, slot: int, shortest: int, longest: int) -> None:
    """Refuses sequences outside the token input's range, naming the prompt: token
    attribution runs sequences of every length from the prompt's to prompt + continuation
    less its last token. Also refuses a static batch size other than 1."""
    batch = model.inputs[slot].dims[0]
    low, high, span = sequence_range(model, slot)
    if shortest < low or (high is not None and longest > high):
        raise _error(
            f"the prompt has {shortest} tokens and with the continuation (less its last token) "
            f"makes {longest}; {model.name} takes sequences of {span} tokens",
            "OUT_OF_RANGE",
            "prompt",
        )
    if batch.size is not None and batch.size != 1:
        raise _error(
            f"{model.name} takes exactly {batch.size} rows; token attribution needs a model "
            "exported with a dynamic batch (or a batch of 1)",
            "NOT_A_TOKEN_MODEL",
            "model.name",
        )


def vocabulary_size(model: Model, slot: int) -> int | None:
    """The rows of the token embedding's weight; None when there is no token embedding."""
    node = token_embedding(model, slot)
    if node is None:
        return None
    found = next(n for n in model.program.graph.nodes if n.name == node)
    weight = found.args[0].meta.get("val") if isinstance(found.args[0], torch.fx.Node) else None
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None


def check_continuation(model: Model, slot: int, continuation: torch.Tensor) -> None:
    """Checks that output 0 holds logits (N, S, V) over the token ids' batch and sequence,
    and that every continuation token lies within V."""
    ids, dims = model.inputs[slot].dims, model.outputs[0].dims
    if len(dims) != 3 or dims[0].symbol != ids[0].symbol or dims[1].symbol != ids[1].symbol:
        raise _error(
            f"a continuation is scored by {model.name}'s output 0, which must be logits shaped "
            "(N, S, V) like the token ids; attribute an objective instead",
            "WRONG_SHAPE",
            "continuation",
        )
    vocabulary = dims[2].size
    if vocabulary is not None and continuation.numel() and int(continuation.max()) >= vocabulary:
        raise _error(
            f"continuation token ids must lie in [0, {vocabulary})", "OUT_OF_RANGE", "continuation"
        )


def check_token_ids(
    model: Model,
    slot: int,
    prompt: torch.Tensor,
    continuation: torch.Tensor | None,
    baseline_token: int,
) -> None:
    """Token ids (and the baseline token) within the token embedding's vocabulary."""
    vocabulary = vocabulary_size(model, slot)
    if vocabulary is None:
        return
    for field, values in (("prompt", prompt), ("continuation", continuation)):
        if (
            values is not None
            and values.numel()
            and (int(values.min()) < 0 or int(values.max()) >= vocabulary)
        ):
            raise _error(f"{field} token ids must lie in [0, {vocabulary})", "OUT_OF_RANGE", field)
    if not 0 <= baseline_token < vocabulary:
        raise _error(
            f"baseline_token must lie in [0, {vocabulary})", "OUT_OF_RANGE", "baseline_token"
        )
