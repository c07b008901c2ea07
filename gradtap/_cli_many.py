"""`gradtap analyze --inputs-dir`: one stream over a directory of inputs, one .npz out per item."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import typer

if TYPE_CHECKING:
    from client import Client, Objective, TensorSpec
else:
    from gradtap.client import Client, Objective, TensorSpec

SUFFIXES = (".npy", ".npz")


def item_files(directory: Path) -> list[Path]:
    """The items of a directory: its .npy and .npz files, sorted by name."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise typer.BadParameter(
            f"{directory} holds no .npy or .npz file", param_hint="--inputs-dir"
        )
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise typer.BadParameter(
                f"{stems[path.stem].name} and {path.name} would both be written as {path.stem}.npz",
                param_hint="--inputs-dir",
            )
        stems[path.stem] = path
    return files


def load_item(path: Path, specs: Sequence[TensorSpec]) -> list[np.ndarray]:
    """One item's inputs: an .npy holds the only input, an .npz the inputs in order; float
    inputs are cast to the float dtype the model takes."""
    from gradtap.cli import FLOAT_DTYPES, _numpy_dtype

    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = [archive[k] for k in archive.files]
        else:
            arrays = [np.load(path, allow_pickle=False)]
    except (OSError, ValueError) as e:
        raise typer.BadParameter(
            f"{path} is not readable: {e}", param_hint="--inputs-dir"
        ) from None
    for i, (array, spec) in enumerate(zip(arrays, specs)):
        if array.dtype.name in FLOAT_DTYPES and spec.dtype in FLOAT_DTYPES:
            arrays[i] = array.astype(_numpy_dtype(spec.dtype), copy=False)
    return arrays


def analyze_dir(
    client: Client,
    model: str,
    directory: Path,
    out_dir: Path,
    targets: Sequence[str],
    objective: Objective | None,
    *,
    input_grad: bool,
    activations: bool,
) -> int:
    """Runs every item of `directory` through analyze_many with a progress bar on stderr,
    writing OUT_DIR/NAME.npz per item; returns how many items were written."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    from gradtap.cli import save

    files = item_files(directory)
    specs = client.describe(model).inputs
    out_dir.mkdir(parents=True, exist_ok=True)

    def items() -> Iterator[list[np.ndarray]]:
        for path in files:
            yield load_item(path, specs)

    written = 0
    stream = client.analyze_many(
        model, items(), targets, objective, input_grads=input_grad, activations=activations
    )
    bar: Any = tqdm(total=len(files), unit="item", desc=model, file=sys.stderr)
    with stream, bar:
        for result in stream:
            save(result, out_dir / f"{files[result.metadata['item']].stem}.npz")
            written += 1
            bar.update(1)
    return written
