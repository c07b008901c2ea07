"""`gradtap models`, `gradtap describe` and `gradtap health`: what a server serves, and how."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import typer

from ._client import TensorSpec
from .options import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    Address,
    Digest,
    Json,
    Model,
    Timeout,
    Token,
    connect,
)
from .show import shape_text, table


def models(
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
    as_json: Json = False,
) -> None:
    """List the served models: name, source and digest."""
    with connect(address, token, timeout) as client:
        infos = client.list_models()
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(m) for m in infos], indent=2))
        return
    typer.echo(
        table([["NAME", "SOURCE", "DIGEST"]] + [[m.name, m.source, m.digest] for m in infos])
    )


def _specs_table(specs: Sequence[TensorSpec]) -> str:
    rows = [["INDEX", "NAME", "DTYPE", "SHAPE", "DYNAMIC", "VALUES"]]
    for i, spec in enumerate(specs):
        dynamic: dict[str, str] = {}
        for d, size in enumerate(spec.shape):
            if size is None:
                name = spec.dims[d] if d < len(spec.dims) and spec.dims[d] else f"dim {d}"
                low = spec.min_shape[d] if d < len(spec.min_shape) else 0
                high = spec.max_shape[d] if d < len(spec.max_shape) else None
                dynamic.setdefault(name, f"{name} {low}..{'' if high is None else high}")
        values = f"0..{spec.high - 1}" if spec.high else ""
        rows.append(
            [
                str(i),
                spec.name,
                spec.dtype,
                shape_text(spec.shape, spec.dims),
                ", ".join(dynamic.values()),
                values,
            ]
        )
    return table(rows, indent="  ")


def describe(
    model: Model,
    digest: Digest = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
    as_json: Json = False,
) -> None:
    """Show a model's inputs, outputs, modules and nodes.

    Shapes name each dynamic dimension (batch, sequence...). Any node name or module path
    listed here can be a --target of `gradtap analyze` or the --node of `gradtap attribute`;
    PATH#K names call K of a module called several times.
    """
    with connect(address, token, timeout) as client:
        d = client.describe(model, digest=digest)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(d), indent=2))
        return
    modules = [
        [path, "->", node, f"(calls: {', '.join(d.calls[path])})" if path in d.calls else ""]
        for path, node in d.modules.items()
    ]
    nodes = [["NAME", "OP", "DTYPE", "SHAPE", "DIFFERENTIABLE"]] + [
        [n.name, n.op, n.dtype, shape_text(n.shape, n.dims), "yes" if n.differentiable else "no"]
        for n in d.nodes
    ]
    notes = [[n.name, n.note] for n in d.nodes if n.note]
    sections = [
        table([["model", d.name], ["source", d.source], ["digest", d.digest]]),
        "inputs\n" + _specs_table(d.inputs),
        "outputs\n" + _specs_table(d.outputs),
        "modules (path -> node)\n" + (table(modules, indent="  ") or "  (none)"),
        "nodes\n" + table(nodes, indent="  "),
        *(["notes\n" + table(notes, indent="  ")] if notes else []),
        f"parameters: {len(d.parameters)}",
    ]
    typer.echo("\n\n".join(sections))


def health(
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
) -> None:
    """Check the server's health; exit 0 only when SERVING.

    Prints SERVING, NOT_SERVING, ... or, when the server cannot be reached, the error.
    """
    with connect(address, token, timeout) as client:
        status = client.health()
    typer.echo(status)
    if status != "SERVING":
        raise typer.Exit(1)
