"""Names in the user's words: of a model's inputs and outputs (from its pytree specs), of its
dynamic dimensions (batch, sequence, dim2...), and the vocabulary size of its token inputs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import sympy  # type: ignore[import-untyped]
import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram

DIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")
"""What a dimension's name may look like (an archive's gradtap.json may declare names)."""


def _path_text(path: Sequence[Any]) -> str:
    parts = []
    for key in path:
        if isinstance(key, pytree.MappingKey):
            parts.append(str(key.key))
        elif isinstance(key, pytree.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, pytree.GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(key))
    return ".".join(parts)


def _leaf_paths(spec: pytree.TreeSpec) -> list[tuple[Any, ...]]:
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    leaves, _ = pytree.tree_flatten_with_path(tree)
    return [tuple(path) for path, _ in leaves]


def input_names(program: ExportedProgram, placeholders: Sequence[str]) -> list[str]:
    """A name per user input, in order: a keyword argument's key (`input_ids`), a positional
    argument's parameter name (`x`), with the path inside a nested argument (`pair.0`).
    `placeholders` are the graph's user-input placeholder names, the fallback."""
    spec = program.call_spec.in_spec
    if spec is None or spec.num_leaves != len(placeholders):
        return list(placeholders)
    signature = program.module_call_graph[0].signature if program.module_call_graph else None
    arg_names = list(getattr(signature, "forward_arg_names", None) or [])
    names = []
    for path, placeholder in zip(_leaf_paths(spec), placeholders):
        if len(path) >= 2 and isinstance(path[0], pytree.SequenceKey) and path[0].idx == 1:
            names.append(_path_text(path[1:]))  # kwargs: the key, then any nested path
        elif len(path) >= 2 and isinstance(path[1], pytree.SequenceKey):
            i = path[1].idx
            head = arg_names[i] if i < len(arg_names) else placeholder
            names.append(".".join([head, _path_text(path[2:])]) if len(path) > 2 else head)
        else:
            names.append(placeholder)
    return _unique(names)


def output_names(program: ExportedProgram, count: int) -> list[str]:
    """A name per user output, in order: a field's name (`logits`), with its position inside
    a tuple field (`hidden_states.3`), or the position in a plain tuple (`0`); a single
    tensor is `output`."""
    spec = program.call_spec.out_spec
    if spec is None or spec.num_leaves != count:
        return [str(i) for i in range(count)]
    return _unique([_path_text(path) or "output" for path in _leaf_paths(spec)])


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    result = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        result.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return result


def dim_names(
    inputs: Sequence[tuple[str, torch.Tensor]], declared: dict[str, str]
) -> dict[Any, str]:
    """A readable name for each symbol of the inputs' dynamic dimensions: the name the archive
    declares for it (gradtap.json "dims", written by `gradtap export`), else `batch` for a
    first dimension, `sequence` for the second of token ids or masks (integer inputs), else
    `dim2`...; a name already taken becomes `INPUT.D` (dimension D of that input)."""
    names: dict[Any, str] = {}
    taken = set(declared.values())
    for input_name, value in inputs:
        for d, size in enumerate(value.shape):
            if isinstance(size, int):
                continue
            expr = size.node.expr
            if not expr.is_Symbol or expr in names:
                continue
            name = declared.get(str(expr))
            if name is None:
                integer = not (value.dtype.is_floating_point or value.dtype.is_complex)
                name = "batch" if d == 0 else "sequence" if d == 1 and integer else f"dim{d}"
                if name in taken:
                    name = f"{input_name}.{d}"
            names[expr] = name
            taken.add(name)
    return names


def expression_text(expr: Any, names: dict[Any, str]) -> str:
    """A dimension's expression with its symbols named: `sequence - 1`, `2*batch`."""
    if expr in names:
        return names[expr]
    mapping = {s: sympy.Symbol(names[s]) for s in getattr(expr, "free_symbols", ()) if s in names}
    return str(expr.xreplace(mapping)) if mapping else str(expr)


_PASS_THROUGH = frozenset(
    {
        "aten.view.default",
        "aten.reshape.default",
        "aten.unsqueeze.default",
        "aten.squeeze.dim",
        "aten.expand.default",
        "aten.slice.Tensor",
        "aten.clone.default",
        "aten.contiguous.default",
        "aten._to_copy.default",
        "aten.to.dtype",
        "aten.to.dtype_layout",
    }
)


def index_bounds(graph: torch.fx.Graph, placeholders: Sequence[str]) -> dict[str, int]:
    """For integer inputs that index an embedding (token ids): the embedding's row count,
    the exclusive upper bound of their values. Follows shape-only operations between."""
    by_name = {n.name: n for n in graph.nodes}
    bounds: dict[str, int] = {}
    for name in placeholders:
        node = by_name.get(name)
        value = node.meta.get("val") if node is not None else None
        if node is None or not isinstance(value, torch.Tensor) or value.is_floating_point():
            continue
        rows: list[int] = []
        frontier, seen = [node], {node}
        while frontier:
            current = frontier.pop()
            for user in current.users:
                target = str(user.target)
                if target == "aten.embedding.default" and user.args[1] is current:
                    weight = user.args[0]
                    table = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
                    if isinstance(table, torch.Tensor) and isinstance(table.shape[0], int):
                        rows.append(table.shape[0])
                elif target in _PASS_THROUGH and user.args[0] is current and user not in seen:
                    seen.add(user)
                    frontier.append(user)
        if rows:
            bounds[name] = min(rows)
    return bounds
