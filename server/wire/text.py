"""Text in, tokens out on the wire: a request's texts tokenized, and the tokens made of them
put in the result's header (server/models/text.py does the tokenizing)."""

from __future__ import annotations

from gradtap.v1 import gradtap_pb2 as pb

from ..errors import InvalidArgument
from ..models.model import Model
from ..models.text import Tokenized, tokenize


def texts(request: pb.AnalyzeRequest, served: Model) -> Tokenized | None:
    """The request's texts tokenized, if it sends texts (and no inputs)."""
    if not request.texts:
        return None
    if request.inputs:
        raise InvalidArgument(
            "give inputs or texts, not both", reason="INPUTS_AND_TEXTS", field="texts"
        )
    return tokenize(served, list(request.texts), "texts")


def token_rows(tokenized: Tokenized | None) -> list[pb.TokenRow]:
    """The header's tokens: each row's token strings, ids and attention mask."""
    if tokenized is None:
        return []
    return [
        pb.TokenRow(tokens=tokens, ids=ids, attention_mask=mask)
        for tokens, ids, mask in zip(
            tokenized.tokens, tokenized.ids.tolist(), tokenized.mask.tolist()
        )
    ]
