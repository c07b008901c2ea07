"""`gradtap export`, run as a user would, and the random inputs the CLI draws for token
models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gradtap.client import TensorSpec
from gradtap.server.models.archive import read_archive

from gradtap.cli.arrays import SEQUENCE_LENGTH, random_inputs

from .running import gradtap

ROOT = Path(__file__).resolve().parents[2]


def test_export_writes_a_checked_archive_of_a_factorys_module(tmp_path: Path) -> None:
    out = tmp_path / "block.pt2"
    result = gradtap(
        "export",
        "python:tests.real_models:in_place_block",
        "--input-shape",
        "4,8,8",
        "--batch",
        "1..16",
        "--out",
        str(out),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "served outputs match the module within atol 1e-05 + rtol 0.0001" in result.stdout
    assert "(batch 1..16, 4, 8, 8)" in result.stdout
    assert "matches the original module" in result.stderr  # the progress lines
    assert "note: " in result.stderr  # the view write that stays in place is reported
    assert read_archive(out.read_bytes()).options["dims"]  # the batch's name travels along


def test_export_names_the_cause_of_a_bad_source_and_of_a_missing_shape(tmp_path: Path) -> None:
    out = str(tmp_path / "m.pt2")
    result = gradtap("export", "onnx:model.onnx", "--out", out, cwd=ROOT)
    assert result.returncode == 2
    assert "is not one of hf:DIRECTORY | timm:NAME | torchvision:NAME" in result.stderr
    result = gradtap("export", "python:tests.real_models:in_place_block", "--out", out, cwd=ROOT)
    assert result.returncode == 1
    assert "need --input-shape" in result.stderr
    result = gradtap("export", "hf:/nonexistent", "--out", str(tmp_path / "m.onnx"), cwd=ROOT)
    assert result.returncode == 2 and ".pt2" in result.stderr


def spec(name: str, dtype: str, high: int | None = None) -> TensorSpec:
    return TensorSpec(
        dtype=dtype,
        shape=(None, None),
        min_shape=(1, 2),
        max_shape=(64, 512),
        name=name,
        dims=("batch", "sequence"),
        high=high,
    )


def test_random_token_inputs_are_ids_of_the_vocabulary_a_mask_of_ones_and_16_long() -> None:
    ids, mask = random_inputs([spec("input_ids", "int64", 97), spec("attention_mask", "int64")], 0)
    assert ids.shape == mask.shape == (1, SEQUENCE_LENGTH) and SEQUENCE_LENGTH == 16
    assert ids.min() >= 0 and ids.max() < 97 and len(np.unique(ids)) > 1
    assert (mask == 1).all()


def test_a_random_sequence_stays_within_its_range() -> None:
    short = TensorSpec(
        dtype="int64", shape=(None, None), min_shape=(1, 2), max_shape=(8, 6), dims=("batch", "s")
    )
    assert random_inputs([short], 0)[0].shape == (1, 6)
