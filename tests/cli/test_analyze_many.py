"""`gradtap analyze-many`: a directory of items over one stream, one .npz per item."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gradtap.client import Client, Objective

from .running import RTOL, gradtap, image


def items_in(directory: Path, count: int, seed: int) -> list[np.ndarray]:
    directory.mkdir()
    items = [image(seed + k) for k in range(count)]
    for k, x in enumerate(items):
        np.save(directory / f"item{k:02d}.npy", x)
    return items


def test_cli_analyzes_a_directory_with_progress_and_one_file_per_item(
    address: str, client: Client, tmp_path: Path
) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    items = items_in(inputs, 5, seed=9)
    result = gradtap(
        "analyze-many", "seed-convnet", "--inputs-dir", str(inputs), "--out-dir", str(out),
        "--target", "relu_1", "--objective", "logit:3", "--address", address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "5/5" in result.stderr  # the progress bar
    assert sorted(p.name for p in out.iterdir()) == [f"item{k:02d}.npz" for k in range(5)]
    for k, x in enumerate(items):
        single = client.analyze("seed-convnet", x, ["relu_1"], Objective.logit(3))
        with np.load(out / f"item{k:02d}.npz") as saved:
            np.testing.assert_allclose(
                saved["gradient/relu_1"], single.gradients["relu_1"], rtol=RTOL
            )
            assert float(saved["loss"]) == pytest.approx(single.loss, rel=RTOL)


def test_analyze_inputs_dir_still_works_with_a_note(
    address: str, client: Client, tmp_path: Path
) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    items = items_in(inputs, 2, seed=20)
    result = gradtap(
        "analyze", "seed-convnet", "--inputs-dir", str(inputs), "--out-dir", str(out),
        "--target", "relu_1", "--objective", "logit:1", "--input-grad", "--address", address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "note: analyze --inputs-dir DIR --out-dir OUT is deprecated; use analyze-many" in (
        result.stderr
    )
    assert "note: --input-grad is deprecated; use --input-grads" in result.stderr
    for k, x in enumerate(items):
        single = client.analyze("seed-convnet", x, "relu_1", Objective.logit(1), input_grads=True)
        with np.load(out / f"item{k:02d}.npz") as saved:
            np.testing.assert_allclose(saved["input_grad/0"], single.input_grads[0], rtol=RTOL)


def test_param_grads_and_precision_reach_every_item(
    address: str, client: Client, tmp_path: Path
) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    (x,) = items_in(inputs, 1, seed=30)
    result = gradtap(
        "analyze-many", "seed-convnet", "--inputs-dir", str(inputs), "--out-dir", str(out),
        "--objective", "logit:2", "--param-grads", "fc.bias", "--precision", "bfloat16",
        "--address", address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    single = client.analyze(
        "seed-convnet", x, [], Objective.logit(2), param_grads=["fc.bias"], precision="bfloat16"
    )
    with np.load(out / "item00.npz") as saved:
        np.testing.assert_allclose(saved["param_grad/fc.bias"], single.param_grads["fc.bias"])
