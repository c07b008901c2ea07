"""Text in, tokens out: a model whose archive carries its tokenizer (a `tokenizer.json` in its
extra files, as `gradtap export hf:DIR` writes it) takes text, and names its tokens.

tokenizer.json is data, read by `tokenizers.Tokenizer.from_str`: nothing in it runs. The
server tokenizes each row with the tokenizer's special tokens, pads the rows to the longest
as the archive's padding declaration says (server/models/padding.py; rows of one length need
none), and fills the model's inputs as token attribution does (server/models/tokens.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FailedPrecondition, InvalidArgument, ModelLoadError
from .model import Model
from .tokens import FILLED_INPUTS, fill, sequence_range, token_input

TOKENIZER_FILE = "tokenizer.json"
"""The extra file of an archive that holds its tokenizer (Hugging Face's tokenizers format)."""

MAX_TEXT_CHARACTERS = 1 << 20
"""The longest text a row may send (the model's sequence range limits it far sooner)."""


def read_tokenizer(text: str) -> Any:
    """A tokenizers.Tokenizer from tokenizer.json's text, its own padding and truncation off
    (the server pads as the archive declares; the model's range refuses what is too long)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ModelLoadError(
            f"the archive carries {TOKENIZER_FILE}, and reading it needs the tokenizers "
            "package (pip install tokenizers)"
        ) from e
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises its own Exception types on malformed files
        raise ModelLoadError(f"extra/{TOKENIZER_FILE}: tokenizers cannot read it: {e}") from e
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


@dataclass(frozen=True)
class Tokenized:
    """Rows of text as the tokenizer made them, padded to the longest."""

    ids: torch.Tensor
    """(rows, length) int64 token ids."""
    mask: torch.Tensor
    """(rows, length) int64 attention mask: 1 for the text's tokens, 0 for padding."""
    tokens: list[list[str]]
    """Each row's token strings, "" at padding."""


def _error(message: str, reason: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, field=field)


def tokenizer_of(model: Model, field: str) -> Any:
    """The model's tokenizer; FailedPrecondition naming `field` when its archive has none."""
    if model.tokenizer is None:
        raise FailedPrecondition(
            f"{model.name} has no tokenizer (its archive carries no {TOKENIZER_FILE}): send "
            "token ids instead of text, or export it with `gradtap export hf:DIR` from a "
            "directory holding its tokenizer",
            reason="NO_TOKENIZER",
            field=field,
        )
    return model.tokenizer


def encode(model: Model, text: str, field: str, special_tokens: bool = True) -> Tokenized:
    """One text as one row, unpadded."""
    return tokenize(model, [text], field, special_tokens=special_tokens)


def tokenize(
    model: Model, texts: Sequence[str], field: str, special_tokens: bool = True
) -> Tokenized:
    """Rows of text tokenized and padded as the archive declares. Errors name `field`
    (`texts`, `prompt_text`), or `field[i]` for one row."""
    tokenizer = tokenizer_of(model, field)
    for i, text in enumerate(texts):
        if len(text) > MAX_TEXT_CHARACTERS:
            raise _error(
                f"{field}[{i}] has {len(text)} characters; at most {MAX_TEXT_CHARACTERS}",
                "TOO_LARGE",
                f"{field}[{i}]",
            )
    rows = tokenizer.encode_batch(list(texts), add_special_tokens=special_tokens)
    lengths = [len(row.ids) for row in rows]
    longest = max(lengths, default=0)
    padding = model.padding
    if padding is None and len(set(lengths)) > 1:
        raise _error(
            f"{field} make rows of {min(lengths)} to {longest} tokens, and {model.name} "
            "declares no padding (its archive's gradtap.json): send texts of one length in "
            "tokens, or one text per call",
            "UNPADDED_MODEL",
            field,
        )
    left = padding is not None and padding.side == "left"
    pad_id = padding.pad_token_id if padding is not None else 0
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), longest), dtype=torch.int64)
    tokens: list[list[str]] = []
    for i, row in enumerate(rows):
        n = len(row.ids)
        own = slice(longest - n, longest) if left else slice(0, n)
        ids[i, own] = torch.tensor(row.ids, dtype=torch.int64)
        mask[i, own] = 1
        blank = [""] * (longest - n)
        tokens.append(blank + list(row.tokens) if left else list(row.tokens) + blank)
    return Tokenized(ids, mask, tokens)


def text_inputs(model: Model, tokenized: Tokenized, field: str) -> list[torch.Tensor]:
    """The model's inputs for tokenized rows: the ids, the attention mask, and the inputs
    the server fills (zeros for token_type_ids; position_ids counting the row's tokens from 0,
    following the mask)."""
    try:
        slot = token_input(model)
    except InvalidArgument as e:
        raise _error(
            f"{field} cannot fill {model.name}'s inputs: {e.message}", "NOT_A_TOKEN_MODEL", field
        ) from e
    inputs = fill(model, slot, tokenized.ids)
    positions = (tokenized.mask.cumsum(-1) - 1).clamp(min=0)  # following the mask
    for i, name in enumerate(model.input_nodes):
        if name == "attention_mask":
            inputs[i] = tokenized.mask.to(model.inputs[i].dtype)
        elif name == "position_ids":
            inputs[i] = positions.to(model.inputs[i].dtype)
    _check_length(model, slot, tokenized.ids.shape[1], field)
    return inputs


def _check_length(model: Model, slot: int, length: int, field: str) -> None:
    low, high, span = sequence_range(model, slot)
    if length < low or (high is not None and length > high):
        raise _error(
            f"{field} make {length} tokens (with the tokenizer's special tokens); "
            f"{model.name} takes sequences of {span} tokens",
            "OUT_OF_RANGE",
            field,
        )


__all__ = ["FILLED_INPUTS", "TOKENIZER_FILE", "Tokenized", "read_tokenizer", "tokenize"]
