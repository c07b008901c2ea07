"""`gradtap models` (and its load, unload and default), `gradtap describe` and `gradtap
health`: what a server serves, how, and which versions."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from ._client import ModelInfo, TensorSpec
from .options import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    Address,
    Digest,
    Json,
    Model,
    ModelVersion,
    Timeout,
    Token,
    checked_version,
    connect,
)
from .show import shape_text, table

models_app = typer.Typer(
    name="models",
    help="List the served models, or load, unload and pick versions (model control).",
    invoke_without_command=True,
    rich_markup_mode=None,
)


@models_app.callback()
def models(
    context: typer.Context,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
    as_json: Json = False,
) -> None:
    """List the served models: one line per version, its state, source and digest; * marks
    each model's default version.

    The load, unload and default commands need a server started with --model-control and a
    token holding @admin.
    """
    if context.invoked_subcommand is not None:
        return
    with connect(address, token, timeout) as client:
        infos = client.list_models()
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(m) for m in infos], indent=2))
        return
    rows = [["NAME", "VERSION", "STATE", "SOURCE", "DIGEST", "REASON"]]
    for m in infos:
        for v in m.versions:
            default = "*" if v.version == m.default_version else ""
            rows.append([m.name, v.version + default, v.state, v.source, v.digest or "-", v.reason])
    typer.echo(table(rows))


@models_app.command("load")
def load(
    model: Model,
    archive: Annotated[
        Path | None,
        typer.Argument(
            exists=True,
            dir_okay=False,
            readable=True,
            metavar="[ARCHIVE]",
            help="An archive from torch.export.save to upload; without it, the server loads "
            "MODEL's archives from its own --model-repository again.",
        ),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(
            "--version",
            metavar="VERSION",
            callback=checked_version,
            help="The version to load: [A-Za-z0-9][A-Za-z0-9._-]{0,63}. An upload without "
            "it becomes one past the model's highest numeric version; a reload without it "
            "loads every version in the repository.",
        ),
    ] = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
) -> None:
    """Load a version of a model: upload ARCHIVE, or reload the server's repository archives.

    A READY version of that name keeps serving until the new one is READY; calls naming no
    version then get the newest READY version (or the pinned default).
    """
    _check_name(model)
    with connect(address, token, timeout) as client:
        if archive is not None:
            loaded = client.load_model(model, archive, version=version)
            typer.echo(f"{model} version {loaded.version} is {loaded.state} ({loaded.digest})")
            return
        info = client.load_model_from_repository(model, version)
    typer.echo(_versions(info))


@models_app.command("unload")
def unload(
    model: Model,
    version: Annotated[
        str | None,
        typer.Option(
            "--version",
            metavar="VERSION",
            callback=checked_version,
            help="The version to unload; without it, all.",
        ),
    ] = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
) -> None:
    """Unload a version of a model, or the whole model; calls running on it finish first."""
    _check_name(model)
    with connect(address, token, timeout) as client:
        info = client.unload_model(model, version)
    typer.echo(f"{model} is gone" if info is None else _versions(info))


@models_app.command("default")
def default(
    model: Model,
    version: Annotated[
        str | None,
        typer.Argument(
            metavar="[VERSION]",
            callback=checked_version,
            help="A READY version; without it, the default is the newest READY version again.",
        ),
    ] = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
) -> None:
    """Pin the version that calls naming none get, or unpin it."""
    _check_name(model)
    with connect(address, token, timeout) as client:
        info = client.set_default_version(model, version)
    typer.echo(_versions(info))


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _check_name(model: str) -> None:
    """A name model control can take: the server's rule, without "..", checked before sending."""
    if not MODEL_NAME.fullmatch(model) or ".." in model:
        raise typer.BadParameter(
            f"a model name matches {MODEL_NAME.pattern} without '..'", param_hint="'MODEL'"
        )


def _versions(info: ModelInfo) -> str:
    rows = [["VERSION", "STATE", "SOURCE", "DIGEST", "REASON"]] + [
        [
            v.version + ("*" if v.version == info.default_version else ""),
            v.state,
            v.source,
            v.digest or "-",
            v.reason,
        ]
        for v in info.versions
    ]
    return f"{info.name}: default version {info.default_version}\n" + table(rows, indent="  ")


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
    version: ModelVersion = None,
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
        d = client.describe(model, digest=digest, version=version)
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
        table(
            [["model", d.name], ["source", d.source], ["digest", d.digest]]
            + ([["tokenizer", "carried: calls may send text"]] if d.has_tokenizer else [])
        ),
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
