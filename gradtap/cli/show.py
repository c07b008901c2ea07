"""What the commands print: aligned tables, and one line of statistics per returned tensor."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PREVIEW = 4
"""How many leading values of each returned tensor the summary shows."""

TENSOR_HEADER = ["KIND", "NAME", "SHAPE", "DTYPE", "MIN", "MAX", "MEAN", "L2", "FIRST"]


def shape_text(shape: Sequence[int | None], names: Sequence[str] = ()) -> str:
    """(batch, 3, 28, 28): a shape as Python writes a tuple, with each dynamic dimension's
    name (from `names`, as describe gives them), or ? where it has none."""
    dims = [
        str(d) if d is not None else (names[i] if i < len(names) and names[i] else "?")
        for i, d in enumerate(shape)
    ]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def table(rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Left-aligned columns separated by two spaces."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        (indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths))).rstrip() for row in rows
    )


def short_digest(digest: str) -> str:
    algorithm, _, value = digest.rpartition(":")
    return f"{algorithm}:{value[:12]}" if algorithm else value[:12]


def _number(value: float) -> str:
    return f"{value:.4g}"


def tensor_row(kind: str, name: str, array: np.ndarray) -> list[str]:
    """kind, name, shape, dtype, min, max, mean, L2 norm and the first values of one tensor."""
    row = [kind, name, shape_text(array.shape), array.dtype.name]
    if array.size == 0:
        return [*row, "-", "-", "-", "-", "[]"]
    values = array.astype(np.float64).ravel()
    first = ", ".join(_number(v) for v in values[:PREVIEW])
    more = ", ..." if values.size > PREVIEW else ""
    return [
        *row,
        _number(values.min()),
        _number(values.max()),
        _number(values.mean()),
        _number(float(np.linalg.norm(values))),
        f"[{first}{more}]",
    ]


def tensors_table(arrays: dict[str, np.ndarray]) -> str:
    """One tensor_row per array keyed kind/name (gradient/relu_1), under TENSOR_HEADER."""
    rows = [TENSOR_HEADER]
    for key, array in arrays.items():
        kind, _, name = key.partition("/")
        rows.append(tensor_row(kind, name, array))
    return table(rows)
