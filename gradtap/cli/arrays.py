"""Arrays on disk and off it: the inputs a command sends, the .npz files it writes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ._client import Client, TensorSpec
from .options import deprecated, note, usage
from .show import shape_text

FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


def numpy_dtype(name: str) -> np.dtype[Any]:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def load_npy(path: Path, option: str) -> np.ndarray:
    """One array saved with np.save; a usage error naming `option` for anything else."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        usage(f"{path} is not a readable .npy file: {e}", option)
    if not isinstance(array, np.ndarray):  # an .npz archive
        usage(f"{path} is an .npz archive; save one array per file with np.save", option)
    return array


SEQUENCE_LENGTH = 16
"""The length a random input gives a dynamic dimension other than the batch (within range)."""


def _size(spec: TensorSpec, d: int) -> int:
    """A dynamic dimension's size in a random input: the batch at its smallest (at least 1),
    any other (a sequence) at SEQUENCE_LENGTH, within the dimension's range."""
    low = max(1, spec.min_shape[d] if d < len(spec.min_shape) else 1)
    if d == 0:
        return low
    high = spec.max_shape[d] if d < len(spec.max_shape) else None
    return max(low, SEQUENCE_LENGTH if high is None else min(high, SEQUENCE_LENGTH))


def random_inputs(specs: Sequence[TensorSpec], seed: int) -> list[np.ndarray]:
    """One seeded input per spec, with the sizes `_size` gives dynamic dimensions (equal
    names, equal sizes): floats standard normal; token ids (an integer input with a known
    upper bound) uniform over the vocabulary; masks (booleans, or integers named like a
    mask) all ones; other integers 0."""
    rng = np.random.default_rng(seed)
    arrays: list[np.ndarray] = []
    sizes: dict[str, int] = {}
    for i, spec in enumerate(specs):
        dims: list[int] = []
        for d, size in enumerate(spec.shape):
            name = spec.dims[d] if size is None and d < len(spec.dims) else ""
            if size is not None:
                dims.append(size)
            else:
                dims.append(sizes.setdefault(name, _size(spec, d)) if name else _size(spec, d))
        shape = tuple(dims)
        label = f"inputs[{i}]" + (f" ({spec.name})" if spec.name else "")
        if spec.dtype in FLOAT_DTYPES:
            array = rng.standard_normal(shape).astype(numpy_dtype(spec.dtype))
            how = "standard normal"
        elif spec.dtype == "bool":
            array, how = np.ones(shape, dtype=np.bool_), "all True"
        elif spec.high:
            array = rng.integers(0, spec.high, shape).astype(numpy_dtype(spec.dtype))
            how = f"token ids drawn from 0..{spec.high - 1}"
        elif "mask" in spec.name:
            array, how = np.ones(shape, dtype=numpy_dtype(spec.dtype)), "all ones (a mask)"
        else:
            array, how = np.zeros(shape, dtype=numpy_dtype(spec.dtype)), "all zeros"
        note(
            f"no --input: {label} is random {spec.dtype} {shape_text(shape)}, {how} "
            f"(--input-seed {seed})"
        )
        arrays.append(array)
    return arrays


def matched_inputs(arrays: list[np.ndarray], specs: Sequence[TensorSpec]) -> list[np.ndarray]:
    """Casts float inputs to the float dtype the model wants; leaves every other dtype alone
    so that the server names a mismatch."""
    matched = list(arrays)
    for i, (array, spec) in enumerate(zip(arrays, specs)):
        given = array.dtype.name
        if given != spec.dtype and given in FLOAT_DTYPES and spec.dtype in FLOAT_DTYPES:
            note(f"inputs[{i}]: cast {given} to {spec.dtype}, the dtype the model takes")
            matched[i] = array.astype(numpy_dtype(spec.dtype))
    return matched


def read_inputs(
    client: Client,
    model: str,
    paths: Sequence[Path] | None,
    input_seed: int | None,
    digest: str | None = None,
    version: str | None = None,
) -> list[np.ndarray]:
    """The inputs of one call: the --input files, or seeded random inputs, each float input
    in the dtype the model takes."""
    arrays = [load_npy(path, "--input") for path in paths or []]
    specs = client.describe(model, digest=digest, version=version).inputs
    if not arrays:
        arrays = random_inputs(specs, 0 if input_seed is None else input_seed)
    return matched_inputs(arrays, specs)


def input_seed_from(input_seed: int | None, seed: int | None, command: str) -> int | None:
    """--input-seed, or the deprecated --seed that meant it in `command`."""
    if seed is None:
        return input_seed
    if input_seed is not None:
        usage("--seed here is the deprecated --input-seed: give one of them", "--seed")
    deprecated(f"--seed in {command}", "--input-seed", "it seeds the random inputs")
    return seed


def save_npz(out: Path, arrays: Mapping[str, Any]) -> int:
    """Writes `arrays` as an .npz at exactly `out`; returns how many it holds. bfloat16,
    which .npy cannot describe, is saved as float32."""
    saved: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        array = np.asarray(value)
        if array.dtype == ml_dtypes.bfloat16:
            note(f"{key}: saved bfloat16 as float32")
            array = array.astype(np.float32)
        saved[key] = array
    with out.open("wb") as f:
        np.savez(f, allow_pickle=False, **saved)
    return len(saved)


def save_result(out: Path, arrays: Mapping[str, Any], array_key: str) -> str:
    """--out of attribute and perturb: an .npz; a .npy path keeps 0.1's bare array of
    `array_key` (deprecated). Returns what was written."""
    if out.suffix == ".npy":
        deprecated("--out FILE.npy", "--out FILE.npz", f"it holds {', '.join(arrays)}")
        array = np.asarray(arrays[array_key])
        if array.dtype == ml_dtypes.bfloat16:
            note(f"{out}: saved bfloat16 as float32")
            array = array.astype(np.float32)
        with out.open("wb") as f:
            np.save(f, array, allow_pickle=False)
        return f"the {array_key} to {out}"
    return f"{save_npz(out, arrays)} arrays to {out}"
