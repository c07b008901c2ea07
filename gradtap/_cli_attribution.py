"""`gradtap attribute` and `gradtap perturb`: parsing their options, showing their results."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import typer

INT_PARAMS = frozenset(
    {"n_steps", "internal_batch_size", "nt_samples", "nt_samples_batch_size", "seed"}
)
FLOAT_PARAMS = frozenset({"stdevs"})
BOOL_PARAMS = frozenset({"abs", "relu_attributions", "multiply_by_inputs", "attr_dim_summation"})
TEXT_PARAMS = frozenset({"method"})
PARAMS = INT_PARAMS | FLOAT_PARAMS | BOOL_PARAMS | TEXT_PARAMS | {"baselines"}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _usage(message: str, option: str) -> typer.BadParameter:
    return typer.BadParameter(message, param_hint=f"'{option}'")


def parse_params(specs: Sequence[str]) -> dict[str, Any]:
    """NAME=VALUE pairs typed by the parameter: integers, stdevs a float, booleans as
    true/false, method a name, baselines a number or an .npy file."""
    params: dict[str, Any] = {}
    for spec in specs:
        name, equals, value = spec.partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not name:
            raise _usage(f"{spec!r} is not NAME=VALUE, e.g. n_steps=20", "--param")
        if name not in PARAMS:
            raise _usage(
                f"unknown parameter {name!r}; use one of {', '.join(sorted(PARAMS))}", "--param"
            )
        if name in params:
            raise _usage(f"{name} is given twice", "--param")
        try:
            if name in INT_PARAMS:
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
            raise _usage(f"{name}={value!r} is not a valid value", "--param") from None
    return params


def _baselines(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        pass
    path = Path(value)
    if not path.is_file():
        raise _usage(f"baselines: {value} is neither a number nor an .npy file", "--param")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise _usage(f"{path} is not a readable .npy file: {e}", "--param") from None
    if not isinstance(array, np.ndarray):
        raise _usage(f"{path} is an .npz archive; save one array with np.save", "--param")
    return array


def parse_targets(text: str | None) -> list[int] | None:
    """K or K,K,...: one class index for every row, or one per row."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise _usage(f"{text!r} is not K or K,K,... (class indices)", "--target") from None


def parse_clamp(text: str | None) -> tuple[float | None, float | None] | None:
    """LO,HI bounds of the perturbed input; either side may be empty (unbounded)."""
    if text is None:
        return None
    low, comma, high = text.partition(",")
    if not comma:
        raise _usage(f"{text!r} is not LO,HI, e.g. 0,1 or ,1", "--clamp")
    try:
        return (float(low) if low.strip() else None, float(high) if high.strip() else None)
    except ValueError:
        raise _usage(f"{text!r} is not LO,HI, e.g. 0,1 or ,1", "--clamp") from None


def save_array(array: np.ndarray, out: Path) -> None:
    """np.save at exactly `out`; bfloat16, which .npy cannot describe, as float32."""
    if array.dtype == ml_dtypes.bfloat16:
        typer.echo(f"note: {out}: saved bfloat16 as float32", err=True)
        array = array.astype(np.float32)
    with out.open("wb") as f:
        np.save(f, array, allow_pickle=False)


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
