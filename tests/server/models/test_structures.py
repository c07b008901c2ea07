"""Archives whose outputs are classes of their own (a Hugging Face ModelOutput, a namedtuple)
are served as dicts of their fields, without importing anything they name; structures that
cannot be read that way, and archives torch cannot read, are refused with the real cause."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from gradtap.server.errors import ModelLoadError
from gradtap.server.models.archive import read_archive
from gradtap.server.models.model import prepare
from torch import nn

from .test_model_loading import edit_json, rewrite


class Pair(NamedTuple):
    scores: torch.Tensor
    hidden: torch.Tensor


# What a user does to export a module returning a namedtuple; the loader never needs it.
if Pair not in torch.utils._pytree.SUPPORTED_SERIALIZED_TYPES:
    torch.utils._pytree._register_namedtuple(Pair, serialized_type_name="tests.Pair")


class ReturnsPair(nn.Module):
    def forward(self, x: torch.Tensor) -> Pair:
        return Pair(scores=x.sum(1), hidden=torch.tanh(x))


class ReturnsDict(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return {"logits": x * 2, "hidden_states": (x + 1, x + 2)}


def saved(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(module, (torch.randn(2, 3),)), buffer)
    return buffer.getvalue()


def out_spec(change: Callable[[dict[str, Any]], None]) -> Callable[[str, bytes], bytes]:
    """An archive edit applying `change` to the root's output spec (its parsed JSON node)."""

    def edit(document: dict[str, Any]) -> None:
        signature = document["graph_module"]["module_call_graph"][0]["signature"]
        protocol, root = json.loads(signature["out_spec"])
        change(root)
        signature["out_spec"] = json.dumps([protocol, root])

    return edit_json("models/model.json", edit)


def test_a_namedtuple_output_is_served_by_its_field_names() -> None:
    archive = read_archive(saved(ReturnsPair()))
    model = prepare("pair", "test", archive.program, torch.device("cpu"), renamed=archive.renamed)
    assert [s.name for s in model.outputs] == ["scores", "hidden"]
    assert [r.fields for r in archive.renamed] == [("scores", "hidden")]


def test_a_class_the_archive_names_is_served_as_a_dict_and_never_imported() -> None:
    def as_model_output(root: dict[str, Any]) -> None:
        root["type"] = "gradtap_canary_package.outputs.CausalLMOutput"

    data = rewrite(saved(ReturnsDict()), out_spec(as_model_output))
    archive = read_archive(data)
    assert "gradtap_canary_package" not in sys.modules
    model = prepare("d", "test", archive.program, torch.device("cpu"), renamed=archive.renamed)
    assert [s.name for s in model.outputs] == ["logits", "hidden_states.0", "hidden_states.1"]
    assert archive.renamed[0].type == "gradtap_canary_package.outputs.CausalLMOutput"
    assert archive.renamed[0].fields == ("logits", "hidden_states")


def test_a_class_whose_context_is_no_list_of_names_is_refused_with_the_reason() -> None:
    def opaque(root: dict[str, Any]) -> None:
        root["type"] = "somewhere.Cache"
        root["context"] = json.dumps({"layers": 2})

    with pytest.raises(ModelLoadError, match="somewhere.Cache, which gradtap cannot serve"):
        read_archive(rewrite(saved(ReturnsDict()), out_spec(opaque)))


def test_an_enum_in_a_context_is_refused_before_torch_would_import_its_module() -> None:
    def enum_key(root: dict[str, Any]) -> None:
        root["context"] = json.dumps([{"__enum__": True, "fqn": "os:system", "name": "x"}, "b"])

    with pytest.raises(ModelLoadError, match="keys are unreadable"):
        read_archive(rewrite(saved(ReturnsDict()), out_spec(enum_key)))


def test_an_archive_torch_cannot_read_is_refused_naming_torchs_own_reason() -> None:
    def future(document: dict[str, Any]) -> None:
        document["schema_version"]["major"] = 999

    with pytest.raises(ModelLoadError) as e:
        read_archive(rewrite(saved(ReturnsPair()), edit_json("models/model.json", future)))
    message = str(e.value)
    assert message.startswith("torch could not read the archive: ")
    assert "999" in message and message != "torch could not read the archive: RuntimeError"
