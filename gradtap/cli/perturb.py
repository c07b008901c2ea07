"""`gradtap perturb`: FGSM or PGD on the server, with a progress bar of the loss."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from ._client import PerturbResult
from .arrays import load_npy, read_inputs, save_result
from .objectives import ObjectiveOptions, parse_objective
from .options import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    OBJECTIVE_SPECS,
    Address,
    ClassDim,
    Digest,
    IgnoreIndex,
    Inputs,
    InputSeed,
    Model,
    ModelVersion,
    ObjectiveNode,
    ObjectiveOutput,
    Position,
    Shift,
    Timeout,
    Token,
    checked_out,
    connect,
    deprecated,
    hidden,
    note,
    out_option,
    output_choice,
    usage,
)
from .show import table


class PerturbMethod(str, Enum):
    """Adversarial loops."""

    fgsm = "fgsm"
    pgd = "pgd"


class Norm(str, Enum):
    """The norm of PGD's ball."""

    Linf = "Linf"
    L2 = "L2"


def parse_clamp(text: str | None) -> tuple[float | None, float | None] | None:
    """LO,HI bounds of the perturbed input; either side may be empty (unbounded)."""
    if text is None:
        return None
    low, comma, high = text.partition(",")
    try:
        if not comma:
            raise ValueError(text)
        return (float(low) if low.strip() else None, float(high) if high.strip() else None)
    except ValueError:
        usage(f"{text!r} is not LO,HI, e.g. 0,1 or ,1", "--clamp")


@contextmanager
def progress(total: int, model: str) -> Iterator[Callable[[int, float], None]]:
    """A tqdm bar on stderr over the steps, showing each step's loss; yields on_step."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    bar: Any = tqdm(total=total, unit="step", desc=model, file=sys.stderr)

    def on_step(step: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.6g}", refresh=False)
        bar.update(1)

    try:
        yield on_step
    finally:
        bar.close()


def perturbation_rows(original: np.ndarray, adversarial: np.ndarray) -> list[list[str]]:
    """How far the input moved: the largest element change and the L2 norm of each row."""
    delta = adversarial.astype(np.float64) - original.astype(np.float64)
    rows = delta.reshape(delta.shape[0], -1) if delta.ndim >= 2 else delta.reshape(1, -1)
    l2 = ", ".join(f"{v:.4g}" for v in np.linalg.norm(rows, axis=1)[:8])
    more = ", ..." if rows.shape[0] > 8 else ""
    return [
        ["max |change|", f"{float(np.abs(delta).max()) if delta.size else 0.0:.4g}"],
        ["L2 per row", f"[{l2}{more}]"],
    ]


def perturb(
    model: Model,
    objective_spec: Annotated[
        str,
        typer.Option(
            "--objective",
            metavar="SPEC",
            help=f"The loss the steps follow: {OBJECTIVE_SPECS.removesuffix(' | none')}.",
        ),
    ],
    epsilon: Annotated[
        float,
        typer.Option(min=0, metavar="EPS", help="FGSM: the step size. PGD: the ball's radius."),
    ],
    inputs: Inputs = None,
    method: Annotated[PerturbMethod, typer.Option(help="FGSM (one step) or PGD.")] = (
        PerturbMethod.fgsm
    ),
    objective_output: ObjectiveOutput = "0",
    objective_node: ObjectiveNode = None,
    position: Position = None,
    class_dim: ClassDim = None,
    ignore_index: IgnoreIndex = None,
    shift: Shift = False,
    step_size: Annotated[
        float | None, typer.Option(min=0, metavar="ALPHA", help="PGD: the size of each step.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="PGD: the number of steps.")
    ] = None,
    norm: Annotated[Norm, typer.Option(help="PGD: the norm of the ball.")] = Norm.Linf,
    targeted: Annotated[
        bool,
        typer.Option(
            "--targeted", help="Descend the objective instead of ascending it (a targeted attack)."
        ),
    ] = False,
    clamp: Annotated[
        str | None,
        typer.Option(metavar="LO,HI", help="Bounds of the input's values, e.g. 0,1 or ,1."),
    ] = None,
    random_start: Annotated[
        bool, typer.Option("--random-start", help="PGD: start from a random point of the ball.")
    ] = False,
    seed: Annotated[
        int | None,
        typer.Option(
            min=0,
            metavar="N",
            help="The call's seed: PGD's random start; without one the server draws it.",
        ),
    ] = None,
    mask: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            metavar="FILE.npy",
            help="0/1 array shaped like the input: which elements may move.",
        ),
    ] = None,
    version: ModelVersion = None,
    digest: Digest = None,
    out: Annotated[
        Path | None,
        out_option("adversarial (the perturbed input), losses, objective_before, objective_after"),
    ] = None,
    input_seed: InputSeed = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
    start_seed: Annotated[int | None, hidden("--start-seed", min=0)] = None,
) -> None:
    """Perturb the input to raise an objective (or lower it, --targeted), on the server.

    Shows a progress bar with each step's loss, then the objective before and after and
    how far the input moved.

    \b
    Example, with `make serve` running (the seed's adversarial example, as PGD):
      gradtap perturb seed-mlp --objective mse:target.npy --objective-node relu_1 \\
          --method pgd --epsilon 0.05 --step-size 0.01 --steps 20 --out adversarial.npz
    """
    if seed is not None:
        note(
            "--seed is the call's seed (PGD's random start); it seeded the random inputs "
            "before, which --input-seed does now"
        )
    if start_seed is not None:
        if seed is not None:
            usage("--start-seed is the deprecated --seed: give one of them", "--start-seed")
        deprecated("--start-seed", "--seed")
        seed = start_seed
    objective = parse_objective(
        objective_spec,
        output_choice(objective_output, "--objective-output"),
        objective_node,
        ObjectiveOptions(position, class_dim, ignore_index, shift),
    )
    if objective is None:
        usage("perturb needs an objective to follow", "--objective")
    bounds = parse_clamp(clamp)
    checked_out(out)
    mask_array = load_npy(mask, "--mask") if mask is not None else None
    with connect(address, token, timeout) as client:
        arrays = read_inputs(client, model, inputs, input_seed, digest, version)
        total = (steps or 0) if method == PerturbMethod.pgd else 1
        with progress(total, model) as on_step:
            result = client.perturb(
                model,
                arrays,
                method.value,
                objective,
                epsilon=epsilon,
                step_size=step_size,
                steps=steps,
                norm=norm.value,
                targeted=targeted,
                clamp=bounds,
                random_start=random_start,
                seed=seed,
                mask=mask_array,
                on_step=on_step,
                version=version,
                digest=digest,
            )
    show(result, arrays, norm if method == PerturbMethod.pgd else None)
    if out is not None:
        saved = {
            "adversarial": result.adversarial,
            "losses": np.asarray(result.losses, dtype=np.float64),
            "objective_before": np.float64(result.objective_before),
            "objective_after": np.float64(result.objective_after),
        }
        typer.echo(f"\nwrote {save_result(out, saved, 'adversarial')}")


def show(result: PerturbResult, arrays: list[np.ndarray], norm: Norm | None) -> None:
    rows = [
        ["model", result.metadata["model"]],
        ["method", result.metadata["method"] + (f" ({norm.value})" if norm else "")],
        ["objective before", f"{result.objective_before:.6g}"],
        ["objective after", f"{result.objective_after:.6g}"],
        ["steps", str(len(result.losses))],
    ]
    if result.metadata["seed"]:
        rows.append(["seed", str(result.metadata["seed"])])
    floating = [a for a in arrays if np.issubdtype(a.dtype, np.floating)]
    if floating:
        rows += perturbation_rows(floating[0], result.adversarial)
    typer.echo(table(rows))
