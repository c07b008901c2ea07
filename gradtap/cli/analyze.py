"""`gradtap analyze` (one call) and `gradtap analyze-many` (a directory of items over one
stream): gradients and activations at named nodes."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from ._client import Client, Objective, Result, TensorSpec
from .arrays import (
    FLOAT_DTYPES,
    input_seed_from,
    numpy_dtype,
    read_inputs,
    save_npz,
)
from .objectives import ObjectiveOptions, describe_objective, objective_for
from .options import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    OBJECTIVE_SPECS,
    Activations,
    Address,
    ClassDim,
    Digest,
    IgnoreIndex,
    InputGrads,
    Inputs,
    InputSeed,
    Model,
    ModelVersion,
    ObjectiveNode,
    ObjectiveOutput,
    ParamGrads,
    Position,
    Precision,
    PrecisionOption,
    Shift,
    Targets,
    Timeout,
    Token,
    checked_out,
    connect,
    deprecated,
    hidden,
    out_option,
    output_choice,
    plot_option,
    usage,
)
from .show import short_digest, table, tensors_table

SUFFIXES = (".npy", ".npz")
OUT_KEYS = (
    "gradient/NAME, activation/NAME, input_grad/I, output/I, param_grad/NAME, "
    "topk_indices/NAME, plus loss"
)

ObjectiveSpec = Annotated[
    str | None,
    typer.Option(
        "--objective",
        metavar="SPEC",
        help=f"The scalar to differentiate: {OBJECTIVE_SPECS}. logit, logit_diff and "
        "prob_diff take one index (token) for every row or one per row; log_prob the tokens "
        "scored in every row; cross_entropy one label per row, or an .npy of labels (N, S) "
        "for a language model. Default: sum when --target, --input-grads or "
        "--objective-node is given.",
        show_default=False,
    ),
]
InputGradDeprecated = Annotated[bool, hidden("--input-grad")]


def named_arrays(result: Result) -> dict[str, np.ndarray]:
    """Every returned tensor keyed kind/name (gradient/relu_1, output/0), as --out saves them."""
    arrays: dict[str, np.ndarray] = {}
    for name, array in result.gradients.items():
        arrays[f"gradient/{name}"] = array
    for name, array in result.activations.items():
        arrays[f"activation/{name}"] = array
    for index, array in sorted(result.input_grads.items()):
        arrays[f"input_grad/{index}"] = array
    for index, array in enumerate(result.outputs):
        arrays[f"output/{index}"] = array
    for name, array in result.param_grads.items():
        arrays[f"param_grad/{name}"] = array
    for name, array in result.topk_indices.items():
        arrays[f"topk_indices/{name}"] = array
    return arrays


def save(result: Result, out: Path) -> int:
    """Writes the result as an .npz at exactly `out` (OUT_KEYS); returns how many arrays."""
    return save_npz(out, {**named_arrays(result), "loss": np.float64(result.loss)})


def summary(result: Result, objective: Objective | None) -> str:
    meta = result.metadata
    t = meta.get("timings", {})
    timings = ", ".join(
        f"{key} {t[f'{key}_ms']:.2f} ms"
        for key in ("decode", "forward", "backward", "collect", "total")
        if f"{key}_ms" in t
    )
    header = table(
        [
            [
                "model",
                f"{meta.get('model', '?')} version {meta.get('model_version', '?')} "
                f"({short_digest(meta.get('model_digest', ''))})",
            ],
            ["device", str(meta.get("device", "?"))],
            ["objective", describe_objective(objective)],
            ["loss", "-" if objective is None else f"{result.loss:.6g}"],
            ["timings", timings],
            ["received", f"{meta.get('bytes_received', 0) / 1024:.1f} KiB"],
        ]
    )
    return header + "\n\n" + tensors_table(named_arrays(result))


def analyze(
    model: Model,
    inputs: Inputs = None,
    texts: Annotated[
        list[str] | None,
        typer.Option(
            "--text",
            metavar="TEXT",
            help="Instead of --input, a row of text (repeat for several rows), which the server "
            "tokenizes with the tokenizer the model's archive carries; the tokens are shown.",
            show_default=False,
        ),
    ] = None,
    targets: Targets = None,
    objective_spec: ObjectiveSpec = None,
    objective_output: ObjectiveOutput = "0",
    objective_node: ObjectiveNode = None,
    position: Position = None,
    class_dim: ClassDim = None,
    ignore_index: IgnoreIndex = None,
    shift: Shift = False,
    input_grads: InputGrads = False,
    activations: Activations = False,
    param_grads: ParamGrads = None,
    precision: PrecisionOption = Precision.full,
    version: ModelVersion = None,
    digest: Digest = None,
    out: Annotated[Path | None, out_option(OUT_KEYS)] = None,
    plot: Annotated[
        Path | None,
        plot_option(
            "with --input-grads the input gradient over the input, else the first "
            "target's gradient."
        ),
    ] = None,
    input_seed: InputSeed = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
    input_grad: InputGradDeprecated = False,
    seed: Annotated[int | None, hidden("--seed")] = None,
    inputs_dir: Annotated[
        Path | None, hidden("--inputs-dir", exists=True, file_okay=False, dir_okay=True)
    ] = None,
    out_dir: Annotated[Path | None, hidden("--out-dir", file_okay=False)] = None,
) -> None:
    """Compute gradients and activations at named nodes.

    Runs one forward and backward pass on the server, then prints the loss, the timings and
    one line per returned tensor: shape, dtype, min, max, mean, L2 norm and first values.

    \b
    Example, with `make serve` running:
      gradtap analyze seed-convnet --target relu_1 --objective cross_entropy:3 --input-grads
      gradtap analyze seed-convnet --input x.npy --target relu_1 --target conv2 \\
          --objective cross_entropy:3 --activations --out result.npz
    """
    input_grads = _input_grads(input_grads, input_grad)
    input_seed = input_seed_from(input_seed, seed, "analyze")
    if inputs_dir is not None or out_dir is not None:
        deprecated("analyze --inputs-dir DIR --out-dir OUT", "analyze-many")
        for given, option in ((inputs, "--input"), (out, "--out"), (plot, "--plot")):
            if given:
                usage(f"{option} takes a single analysis; drop it with --inputs-dir", option)
        if inputs_dir is None or out_dir is None:
            usage("--inputs-dir and --out-dir go together", "--inputs-dir")
        analyze_many(
            model,
            inputs_dir=inputs_dir,
            out_dir=out_dir,
            targets=targets,
            objective_spec=objective_spec,
            objective_output=objective_output,
            objective_node=objective_node,
            position=position,
            class_dim=class_dim,
            ignore_index=ignore_index,
            shift=shift,
            input_grads=input_grads,
            activations=activations,
            param_grads=param_grads,
            precision=precision,
            version=version,
            digest=digest,
            address=address,
            token=token,
            timeout=timeout,
        )
        return
    objective = objective_for(
        objective_spec,
        output_choice(objective_output, "--objective-output"),
        objective_node,
        bool(targets or input_grads),
        ObjectiveOptions(position, class_dim, ignore_index, shift),
    )
    checked_out(out)
    if plot is not None and not (targets or input_grads):
        usage("there is nothing to draw: give --input-grads or a --target", "--plot")
    if texts and inputs:
        usage("give --input files or --text rows, not both", "--text")
    if texts and input_grads:
        usage("token ids have no gradient: drop --input-grads with --text", "--input-grads")
    with connect(address, token, timeout) as client:
        arrays = None if texts else read_inputs(client, model, inputs, input_seed, digest, version)
        try:
            result = client.analyze(
                model,
                arrays,
                targets or [],
                objective,
                input_grads=input_grads,
                activations=activations,
                param_grads=param_grads or (),
                version=version,
                digest=digest,
                precision=precision.value,
                texts=texts or None,
            )
        except ValueError as e:  # an input the wire cannot carry, e.g. complex or object arrays
            usage(str(e), "--input")
    if result.tokens:
        rows = [[str(i), " ".join(t for t in row if t)] for i, row in enumerate(result.tokens)]
        typer.echo(table([["ROW", "TOKENS"], *rows]) + "\n")  # padding ("") left out
    typer.echo(summary(result, objective))
    if out is not None:
        typer.echo(f"\nwrote {save(result, out)} arrays to {out}")
    if plot is not None:
        image = arrays[0] if arrays and 0 in result.input_grads else None
        try:
            written = result.plot(plot, image=image)
        except (ImportError, ValueError) as e:
            usage(str(e), "--plot")
        typer.echo(f"wrote a picture to {written}")


def analyze_many(
    model: Model,
    inputs_dir: Annotated[
        Path,
        typer.Option(
            "--inputs-dir",
            exists=True,
            file_okay=False,
            dir_okay=True,
            metavar="DIR",
            help="The items, analyzed in name order: NAME.npy holds a one-input model's "
            "input, NAME.npz the inputs in order.",
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out-dir",
            file_okay=False,
            metavar="DIR",
            help=f"Where NAME.npz is written for each item ({OUT_KEYS}); created if missing.",
        ),
    ],
    targets: Targets = None,
    objective_spec: ObjectiveSpec = None,
    objective_output: ObjectiveOutput = "0",
    objective_node: ObjectiveNode = None,
    position: Position = None,
    class_dim: ClassDim = None,
    ignore_index: IgnoreIndex = None,
    shift: Shift = False,
    input_grads: InputGrads = False,
    activations: Activations = False,
    param_grads: ParamGrads = None,
    precision: PrecisionOption = Precision.full,
    version: ModelVersion = None,
    digest: Digest = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
    input_grad: InputGradDeprecated = False,
) -> None:
    """Analyze every item of a directory over one stream, one .npz per item.

    Items are sent as results come back, a few in flight, with a progress bar on stderr;
    --timeout covers the whole stream.

    \b
    Example, with `make serve` running:
      gradtap analyze-many seed-convnet --inputs-dir images/ --out-dir grads/ \\
          --target relu_1 --objective logit:3
    """
    input_grads = _input_grads(input_grads, input_grad)
    objective = objective_for(
        objective_spec,
        output_choice(objective_output, "--objective-output"),
        objective_node,
        bool(targets or input_grads),
        ObjectiveOptions(position, class_dim, ignore_index, shift),
    )
    with connect(address, token, timeout) as client:
        count = analyze_dir(
            client,
            model,
            inputs_dir,
            out_dir,
            targets or [],
            objective,
            input_grads=input_grads,
            activations=activations,
            param_grads=param_grads or (),
            precision=precision.value,
            version=version,
            digest=digest,
        )
    typer.echo(f"wrote {count} results to {out_dir}")


def _input_grads(input_grads: bool, input_grad: bool) -> bool:
    if input_grad:
        deprecated("--input-grad", "--input-grads")
    return input_grads or input_grad


def item_files(directory: Path) -> list[Path]:
    """The items of a directory: its .npy and .npz files, sorted by name."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        usage(f"{directory} holds no .npy or .npz file", "--inputs-dir")
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            usage(
                f"{stems[path.stem].name} and {path.name} would both be written as {path.stem}.npz",
                "--inputs-dir",
            )
        stems[path.stem] = path
    return files


def load_item(path: Path, specs: Sequence[TensorSpec]) -> list[np.ndarray]:
    """One item's inputs: an .npy holds the only input, an .npz the inputs in order; float
    inputs are cast to the float dtype the model takes."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = [archive[k] for k in archive.files]
        else:
            arrays = [np.load(path, allow_pickle=False)]
    except (OSError, ValueError) as e:
        usage(f"{path} is not readable: {e}", "--inputs-dir")
    for i, (array, spec) in enumerate(zip(arrays, specs)):
        if array.dtype.name in FLOAT_DTYPES and spec.dtype in FLOAT_DTYPES:
            arrays[i] = array.astype(numpy_dtype(spec.dtype), copy=False)
    return arrays


def analyze_dir(
    client: Client,
    model: str,
    directory: Path,
    out_dir: Path,
    targets: Sequence[str],
    objective: Objective | None,
    **options: Any,
) -> int:
    """Runs every item of `directory` through analyze_many with a progress bar on stderr,
    writing OUT_DIR/NAME.npz per item; returns how many items were written."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    files = item_files(directory)
    specs = client.describe(
        model, digest=options.get("digest"), version=options.get("version")
    ).inputs
    out_dir.mkdir(parents=True, exist_ok=True)

    def items() -> Iterator[list[np.ndarray]]:
        for path in files:
            yield load_item(path, specs)

    written = 0
    bar: Any = tqdm(total=len(files), unit="item", desc=model, file=sys.stderr)
    with client.analyze_many(model, items(), targets, objective, **options) as stream, bar:
        for result in stream:
            save(result, out_dir / f"{files[result.metadata['item']].stem}.npz")
            written += 1
            bar.update(1)
    return written
