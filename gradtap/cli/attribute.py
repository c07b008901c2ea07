"""`gradtap attribute`: an attribution with one of Captum's methods, run on the server."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from ._client import AttributionResult
from .arrays import load_npy, read_inputs, save_result
from .options import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    Address,
    Digest,
    Inputs,
    InputSeed,
    Model,
    ModelVersion,
    Timeout,
    Token,
    checked_out,
    connect,
    deprecated,
    hidden,
    note,
    out_option,
    output_choice,
    plot_option,
    usage,
)
from .show import table, tensors_table

INT_PARAMS = frozenset({"n_steps", "internal_batch_size", "nt_samples", "nt_samples_batch_size"})
FLOAT_PARAMS = frozenset({"stdevs"})
BOOL_PARAMS = frozenset({"abs", "relu_attributions", "multiply_by_inputs", "attr_dim_summation"})
PARAMS = INT_PARAMS | FLOAT_PARAMS | BOOL_PARAMS | {"integration_method", "baselines", "seed"}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class AttributionMethod(str, Enum):
    """Attribution methods, named as Captum's classes in snake case."""

    saliency = "saliency"
    input_x_gradient = "input_x_gradient"
    integrated_gradients = "integrated_gradients"
    smoothgrad = "smoothgrad"
    guided_backprop = "guided_backprop"
    layer_gradient_x_activation = "layer_gradient_x_activation"
    layer_grad_cam = "layer_grad_cam"
    layer_integrated_gradients = "layer_integrated_gradients"
    layer_conductance = "layer_conductance"


def parse_params(specs: list[str]) -> dict[str, Any]:
    """NAME=VALUE pairs typed by the parameter: integers, stdevs a float, booleans as
    true/false, integration_method a name, baselines a number or an .npy file."""
    params: dict[str, Any] = {}
    for spec in specs:
        name, equals, value = spec.partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not name:
            usage(f"{spec!r} is not NAME=VALUE, e.g. n_steps=20", "--param")
        if name == "method":
            deprecated("-p method=", "-p integration_method=", "Captum's method")
            name = "integration_method"
        if name not in PARAMS:
            usage(f"unknown parameter {name!r}; use one of {', '.join(sorted(PARAMS))}", "--param")
        if name in params:
            usage(f"{name} is given twice", "--param")
        try:
            if name in INT_PARAMS or name == "seed":
                params[name] = int(value)
            elif name in FLOAT_PARAMS:
                params[name] = float(value)
            elif name in BOOL_PARAMS:
                if value.lower() not in _TRUE | _FALSE:
                    raise ValueError(value)
                params[name] = value.lower() in _TRUE
            elif name == "baselines":
                params[name] = _baselines(value)
            else:
                params[name] = value
        except ValueError:
            usage(f"{name}={value!r} is not a valid value", "--param")
    return params


def _baselines(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        pass
    path = Path(value)
    if not path.is_file():
        usage(f"baselines: {value} is neither a number nor an .npy file", "--param")
    return load_npy(path, "--param")


def parse_index(text: str | None, option: str) -> list[int] | None:
    """K or K,K,...: one class index for every row, or one per row."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        usage(f"{text!r} is not K or K,K,... (class indices)", option)


def _renamed(new: str | None, old: str | None, new_name: str, old_name: str) -> str | None:
    """The value of an option renamed from `old_name`, said in a note when the old is used."""
    if old is None:
        return new
    if new is not None:
        usage(f"{old_name} is the deprecated {new_name}: give one of them", old_name)
    deprecated(old_name, new_name)
    return old


def attribute(
    model: Model,
    method_argument: Annotated[
        AttributionMethod | None,
        typer.Argument(metavar="METHOD", hidden=True, show_default=False),
    ] = None,
    method: Annotated[
        AttributionMethod | None,
        typer.Option("--method", help="The attribution method.", show_default=False),
    ] = None,
    inputs: Inputs = None,
    index: Annotated[
        str | None,
        typer.Option(
            metavar="K[,K...]",
            help="The class attributed (Captum's target): one index for every row, or one per row.",
        ),
    ] = None,
    node: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="For layer methods: the node, a graph-node name or module path (see "
            "`gradtap describe`).",
        ),
    ] = None,
    output: Annotated[
        str,
        typer.Option(
            metavar="N|NAME",
            help="The model output attributed: its position, or its name (e.g. logits).",
        ),
    ] = "0",
    params: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            metavar="NAME=VALUE",
            help="A parameter of the method, with Captum's name: n_steps=20, "
            "integration_method=riemann_trapezoid (Captum's method), baselines=0 or "
            "baselines=FILE.npy, internal_batch_size=64, nt_samples=10, stdevs=0.2, "
            "abs=false, relu_attributions=true, ...; repeatable.",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="The call's seed: smoothgrad's noise; without one the server draws it.",
        ),
    ] = None,
    version: ModelVersion = None,
    digest: Digest = None,
    out: Annotated[Path | None, out_option("attribution")] = None,
    plot: Annotated[
        Path | None,
        plot_option(
            "the attribution of the first row, over the input for input methods, as "
            "channels for a node's."
        ),
    ] = None,
    input_seed: InputSeed = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
    target: Annotated[str | None, hidden("--target", "-t")] = None,
    layer: Annotated[str | None, hidden("--layer")] = None,
) -> None:
    """Attribute an output to the input, or to a node, with a Captum method.

    Prints the attribution's shape, dtype, min, max, mean, L2 norm and first values.

    \b
    Example, with `make serve` running:
      gradtap attribute seed-convnet --method integrated_gradients --index 3 -p n_steps=32
      gradtap attribute seed-convnet --method layer_grad_cam --index 3 --node conv2 \\
          --out cam.npz --plot cam.png
    """
    if method_argument is not None:
        if method is not None:
            usage("give the method once, as --method", "--method")
        deprecated("the method as an argument (attribute MODEL METHOD)", "--method METHOD")
        method = method_argument
    if method is None:
        usage("which method? e.g. --method saliency", "--method")
    index_text = _renamed(index, target, "--index", "--target")
    node = _renamed(node, layer, "--node", "--layer")
    options = parse_params(params or [])
    if seed is not None:
        note(
            "--seed is the call's seed (smoothgrad's noise); it seeded the random inputs "
            "before, which --input-seed does now"
        )
        if "seed" in options:
            usage("give the seed once: --seed or -p seed=", "--seed")
        options["seed"] = seed
    checked_out(out)
    with connect(address, token, timeout) as client:
        arrays = read_inputs(client, model, inputs, input_seed, digest, version)
        try:
            result = client.attribute(
                model,
                arrays,
                method.value,
                index=parse_index(index_text, "--index"),
                node=node,
                output=output_choice(output, "--output"),
                version=version,
                digest=digest,
                **options,
            )
        except (TypeError, ValueError) as e:  # a parameter the wire cannot carry
            usage(str(e), "--param")
    show(result, index_text)
    if out is not None:
        typer.echo(
            f"\nwrote {save_result(out, {'attribution': result.attribution}, 'attribution')}"
        )
    if plot is not None:
        floating = [a for a in arrays if np.issubdtype(a.dtype, np.floating)]
        image = floating[0] if floating and node is None else None
        try:
            written = result.plot(plot, image=image)
        except (ImportError, ValueError) as e:
            usage(str(e), "--plot")
        typer.echo(f"wrote a picture to {written}")


def show(result: AttributionResult, index: str | None) -> None:
    meta = result.metadata
    rows = [
        ["model", meta["model"]],
        ["method", meta["method"]],
        ["index", index if index is not None else "-"],
        ["attributed to", f"node {meta['node']}" if meta["node"] else "input"],
    ]
    if meta["method"] == "smoothgrad":
        rows.append(["seed", str(meta["seed"])])
    arrays = {f"attribution/{meta['node'] or 'input'}": result.attribution}
    typer.echo(table(rows) + "\n\n" + tensors_table(arrays))
