"""`gradtap perturb`: a progress bar of the loss, and what it saves is what the client returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gradtap.client import Client, Objective

from .running import gradtap


def test_cli_perturb_shows_progress_and_saves_what_the_client_returns(
    client: Client, address: str, tmp_path: Path
) -> None:
    x = np.random.default_rng(6).standard_normal((1, 784)).astype(np.float32)
    target = np.zeros((1, 64), np.float32)
    target[0, 10] = 1
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "target.npy", target)
    out = tmp_path / "adversarial.npz"
    result = gradtap(
        "perturb", "seed-mlp", "--input", str(tmp_path / "x.npy"),
        "--objective", f"mse:{tmp_path / 'target.npy'}", "--objective-node", "relu_1",
        "--method", "pgd", "--epsilon", "0.05", "--step-size", "0.01", "--steps", "7",
        "--clamp", ",2", "--out", str(out), "--address", address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "7/7" in result.stderr and "loss=" in result.stderr
    assert "objective after" in result.stdout
    expected = client.perturb(
        "seed-mlp",
        x,
        "pgd",
        Objective.mse(target, node="relu_1"),
        epsilon=0.05,
        step_size=0.01,
        steps=7,
        clamp=(None, 2),
    )
    with np.load(out) as saved:
        assert sorted(saved.files) == [
            "adversarial", "losses", "objective_after", "objective_before",
        ]  # fmt: skip
        np.testing.assert_array_equal(saved["adversarial"], expected.adversarial)
        np.testing.assert_allclose(saved["losses"], expected.losses, rtol=1e-6)
        assert float(saved["objective_after"]) == expected.objective_after


def test_seed_is_the_random_starts_and_start_seed_still_works(
    client: Client, address: str, tmp_path: Path
) -> None:
    args = [
        "perturb", "seed-mlp", "--objective", "logit:3", "--method", "pgd", "--epsilon", "0.1",
        "--step-size", "0.02", "--steps", "2", "--random-start", "--input-seed", "4",
        "--address", address,
    ]  # fmt: skip
    new = gradtap(*args, "--seed", "17", "--out", "new.npz", cwd=tmp_path)
    assert new.returncode == 0, new.stderr
    assert "note: --seed is the call's seed (PGD's random start)" in new.stderr
    assert "seed" in new.stdout and "17" in new.stdout
    old = gradtap(*args, "--start-seed", "17", "--out", "old.npy", cwd=tmp_path)
    assert old.returncode == 0, old.stderr
    assert "note: --start-seed is deprecated; use --seed" in old.stderr
    assert "note: --out FILE.npy is deprecated; use --out FILE.npz" in old.stderr
    x = np.random.default_rng(4).standard_normal((1, 784)).astype(np.float32)
    expected = client.perturb(
        "seed-mlp", x, "pgd", Objective.logit(3), epsilon=0.1, step_size=0.02, steps=2,
        random_start=True, seed=17,
    )  # fmt: skip
    with np.load(tmp_path / "new.npz") as saved:
        np.testing.assert_array_equal(saved["adversarial"], expected.adversarial)
    np.testing.assert_array_equal(np.load(tmp_path / "old.npy"), expected.adversarial)
