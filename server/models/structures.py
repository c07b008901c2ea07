"""The input and output structures an archive names, read without importing anything.

torch.export.save writes each signature's input and output structure as a pytree spec: a
JSON tree of nodes typed by a class name ("builtins.tuple",
"transformers.modeling_outputs.CausalLMOutputWithPast"). torch.export.load looks every such
name up among the types registered in the loading process, and fails on a model output class
it does not know (a Hugging Face ModelOutput, a namedtuple); it also imports the module of a
defaultdict's factory or of an Enum named in a context. The graph itself is flat, so the
server needs the structure only to name the flat inputs and outputs. `plain_structures`
rewrites every spec into builtin tuples, lists and dicts before torch reads it, remembering
which class each rewritten node was; torch never sees a name it would have to import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import ModelLoadError

_SEQUENCES = {
    "builtins.tuple": "builtins.tuple",
    "builtins.list": "builtins.list",
    "torch.fx.immutable_collections.immutable_list": "builtins.list",
    "collections.deque": "builtins.list",
    "torch.Size": "builtins.tuple",
}
"""Builtin sequence types -> the plain type they are served as (their context is dropped)."""

_MAPPINGS = {
    "builtins.dict": "builtins.dict",
    "collections.OrderedDict": "builtins.dict",
    "torch.fx.immutable_collections.immutable_dict": "builtins.dict",
}
"""Builtin mapping types, whose context is the JSON list of their keys."""

_MAX_DEPTH = 64


@dataclass(frozen=True)
class Renamed:
    """A structure node the archive typed with a class of its own, served as a dict."""

    where: str
    """The signature it was found in: "outputs" or "inputs" (of the model, or of a module)."""
    type: str
    """The class the archive named, e.g. "transformers.modeling_outputs.CausalLMOutput"."""
    fields: tuple[str, ...]
    """Its field names, in order: the keys of the dict it is served as."""

    def __str__(self) -> str:
        return f"its {self.where}, a {self.type}, are served as the fields {', '.join(self.fields)}"


def plain_structures(program: dict[str, Any]) -> list[Renamed]:
    """Rewrites, in place, every input and output spec of a serialized program (models/model.json)
    into builtin types; returns what it renamed. Raises ModelLoadError for a spec node that
    cannot be read as a tuple, list or dict of named fields."""
    graph_module = program.get("graph_module")
    if not isinstance(graph_module, dict):
        raise ModelLoadError("models/model.json has no graph_module")
    namedtuples: dict[str, tuple[str, ...]] = {}
    for name, definition in (graph_module.get("treespec_namedtuple_fields") or {}).items():
        fields = definition.get("field_names") if isinstance(definition, dict) else None
        if isinstance(name, str) and isinstance(fields, list) and _names(fields):
            namedtuples[name] = tuple(fields)
    renamed: list[Renamed] = []
    for entry in graph_module.get("module_call_graph") or []:
        signature = entry.get("signature") if isinstance(entry, dict) else None
        if not isinstance(signature, dict):
            continue
        module = entry.get("fqn") or ""
        for key, where in (("in_spec", "inputs"), ("out_spec", "outputs")):
            text = signature.get(key)
            if not isinstance(text, str):
                continue
            label = f"{where} of module {module!r}" if module else where
            signature[key] = _plain_spec(text, label, namedtuples, renamed)
    # torch would match these against namedtuple types it builds; none remain.
    graph_module["treespec_namedtuple_fields"] = {}
    return renamed


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _plain_spec(
    text: str, where: str, namedtuples: dict[str, tuple[str, ...]], renamed: list[Renamed]
) -> str:
    try:
        protocol, root = json.loads(text)
    except (ValueError, TypeError):
        raise ModelLoadError(f"the {where} structure is not a pytree spec") from None
    plain = _plain_node(root, where, namedtuples, renamed, 0)
    return json.dumps([protocol, plain])


def _plain_node(
    node: Any,
    where: str,
    namedtuples: dict[str, tuple[str, ...]],
    renamed: list[Renamed],
    depth: int,
) -> dict[str, Any]:
    if depth > _MAX_DEPTH:
        raise ModelLoadError(f"the {where} structure nests deeper than {_MAX_DEPTH} levels")
    if not isinstance(node, dict) or not isinstance(node.get("children_spec"), list):
        raise ModelLoadError(f"the {where} structure is not a pytree spec")
    kind = node.get("type")
    children = [
        _plain_node(c, where, namedtuples, renamed, depth + 1) for c in node["children_spec"]
    ]
    if kind is None:
        if children:
            raise ModelLoadError(f"the {where} structure has a leaf with children")
        return {"type": None, "context": None, "children_spec": []}
    if not isinstance(kind, str):
        raise ModelLoadError(f"the {where} structure names a type that is not a string")
    context = node.get("context")
    if kind in _SEQUENCES:
        return {"type": _SEQUENCES[kind], "context": "null", "children_spec": children}
    if kind in _MAPPINGS:
        keys = _keys(context)
        if keys is None or len(keys) != len(children):
            raise ModelLoadError(f"the {where} structure has a {kind} whose keys are unreadable")
        return {"type": "builtins.dict", "context": json.dumps(keys), "children_spec": children}
    fields = _fields(kind, context, namedtuples)
    if fields is None or len(fields) != len(children):
        raise ModelLoadError(
            f"the {where} structure is a {_clip(kind)}, which gradtap cannot serve without "
            "importing that class: its context is not a list of field names. Export the model "
            "so that it returns tensors, tuples, lists or dicts (e.g. return_dict=False)"
        )
    renamed.append(Renamed(where=where, type=kind, fields=tuple(fields)))
    return {"type": "builtins.dict", "context": json.dumps(fields), "children_spec": children}


def _keys(context: Any) -> list[str | int] | None:
    """The keys of a dict-like node: a JSON list of strings and integers."""
    try:
        keys = json.loads(context) if isinstance(context, str) else None
    except ValueError:
        return None
    if not isinstance(keys, list):
        return None
    if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys):
        return None
    return keys if len(set(map(repr, keys))) == len(keys) else None


def _fields(kind: str, context: Any, namedtuples: dict[str, tuple[str, ...]]) -> list[str] | None:
    """The field names of a node typed with a class of the archive's, where they can be read:
    a namedtuple's from the archive's table, a defaultdict's keys, or a context that is the
    list of the names (Hugging Face's ModelOutput, dataclasses registered by name)."""
    if kind == "collections.namedtuple":
        if isinstance(context, str) and context in namedtuples:
            return list(namedtuples[context])
        return None
    try:
        value = json.loads(context) if isinstance(context, str) else None
    except ValueError:
        return None
    if kind == "collections.defaultdict" and isinstance(value, dict):
        value = value.get("dict_context")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return value if len(set(value)) == len(value) else None


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
