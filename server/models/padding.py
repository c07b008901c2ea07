"""Padding declarations: how rows of different lengths may share one batch of a model.

An archive declares it in its gradtap options (`gradtap export` writes it for text models):
{"padding": {"mask": "attention_mask", "side": "left", "pad_token_id": 50256}}. The mask
input says which positions of a row are real (1) and which are padding (0); `side` is where
padding goes (left for causal language models, whose position ids follow the mask; right for
encoders, whose position ids count from the first position); `pad_token_id` fills the token
ids at padded positions. Without a declaration, only rows of equal length share a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ModelLoadError

SIDES = ("left", "right")


@dataclass(frozen=True)
class Padding:
    """A model's padding declaration (see the module docstring)."""

    mask: str
    """The input holding the attention mask: 1 at real positions, 0 at padding."""
    side: str
    """"left" or "right": where padding goes."""
    pad_token_id: int = 0
    """The token id at padded positions (masked out, so any id in the vocabulary works)."""

    def as_options(self) -> dict[str, Any]:
        """The declaration as the archive's gradtap options hold it."""
        return {"mask": self.mask, "side": self.side, "pad_token_id": self.pad_token_id}


def declared_padding(options: dict[str, Any], where: str) -> Padding | None:
    """The padding declaration of an archive's options (`where` names the file in errors);
    None when there is none. Raises ModelLoadError for a malformed one."""
    found = options.get("padding")
    if found is None:
        return None
    if (
        not isinstance(found, dict)
        or not set(found) <= {"mask", "side", "pad_token_id"}
        or not isinstance(found.get("mask"), str)
        or found.get("side") not in SIDES
        or not isinstance(found.get("pad_token_id", 0), int)
        or isinstance(found.get("pad_token_id", 0), bool)
        or found.get("pad_token_id", 0) < 0
    ):
        raise ModelLoadError(
            f'{where}: padding must be {{"mask": INPUT, "side": "left" or "right", '
            '"pad_token_id": a token id}'
        )
    return Padding(found["mask"], found["side"], int(found.get("pad_token_id", 0)))


def padding_of(model: Any, options: dict[str, Any]) -> Padding | None:
    """The model's padding declaration, checked against its inputs: the mask input must be
    one of them, shaped (batch, sequence) with a dynamic sequence dimension."""
    padding = declared_padding(options, "gradtap.json")
    if padding is None:
        return None
    names = list(model.input_nodes)
    if padding.mask not in names:
        raise ModelLoadError(
            f"gradtap.json: padding names the mask input {padding.mask!r}, which "
            f"{model.name} does not take (its inputs: {', '.join(names)})"
        )
    dims = model.inputs[names.index(padding.mask)].dims
    if len(dims) != 2 or dims[1].size is not None:
        raise ModelLoadError(
            f"gradtap.json: padding's mask input {padding.mask!r} must be shaped "
            "(batch, sequence) with a dynamic sequence"
        )
    return padding
