"""`gradtap attribute`: what it saves is what the client returns; the 0.1 spellings still work,
each with a note."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gradtap.client import Client

from .running import gradtap, image


def test_cli_attribute_saves_what_the_client_returns(
    client: Client, address: str, tmp_path: Path
) -> None:
    x = image(0)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "ig.npz"
    result = gradtap(
        "attribute", "seed-convnet", "--method", "integrated_gradients",
        "--input", str(tmp_path / "x.npy"), "--index", "3",
        "-p", "n_steps=8", "-p", "integration_method=riemann_left",
        "--out", str(out), "--address", address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "attribution" in result.stdout
    expected = client.attribute(
        "seed-convnet",
        x,
        "integrated_gradients",
        index=3,
        n_steps=8,
        integration_method="riemann_left",
    ).attribution
    with np.load(out) as saved:
        assert saved.files == ["attribution"]
        np.testing.assert_array_equal(saved["attribution"], expected)


def test_cli_attribute_reports_the_field_of_a_bad_parameter(address: str) -> None:
    result = gradtap(
        "attribute", "seed-convnet", "--method", "saliency", "--index", "1",
        "-p", "n_steps=3", "-a", address,
    )  # fmt: skip
    assert result.returncode == 1
    assert "field: params.n_steps" in result.stderr


def test_the_0_1_spellings_still_work_and_say_what_replaces_them(
    client: Client, address: str, tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", image(1, batch=2))
    old = gradtap(
        "attribute", "seed-convnet", "layer_integrated_gradients", "-i", "x.npy",
        "--target", "3,5", "--layer", "conv2", "-p", "n_steps=4", "-p", "method=riemann_left",
        "--out", "old.npy", "--address", address, cwd=tmp_path,
    )  # fmt: skip
    assert old.returncode == 0, old.stderr
    for said in (
        "the method as an argument (attribute MODEL METHOD) is deprecated; use --method",
        "--target is deprecated; use --index",
        "--layer is deprecated; use --node",
        "-p method= is deprecated; use -p integration_method=",
        "--out FILE.npy is deprecated; use --out FILE.npz",
    ):
        assert f"note: {said}" in old.stderr, old.stderr
    new = gradtap(
        "attribute", "seed-convnet", "--method", "layer_integrated_gradients", "-i", "x.npy",
        "--index", "3,5", "--node", "conv2", "-p", "n_steps=4",
        "-p", "integration_method=riemann_left", "--out", "new.npz",
        "--address", address, cwd=tmp_path,
    )  # fmt: skip
    assert new.returncode == 0, new.stderr
    assert "deprecated" not in new.stderr
    with np.load(tmp_path / "new.npz") as saved:
        np.testing.assert_array_equal(np.load(tmp_path / "old.npy"), saved["attribution"])


def test_seed_is_the_calls_seed_and_says_that_it_changed(
    client: Client, address: str, tmp_path: Path
) -> None:
    result = gradtap(
        "attribute", "seed-convnet", "--method", "smoothgrad", "--index", "2",
        "-p", "nt_samples=3", "--seed", "5", "--input-seed", "9", "--out", "sg.npz",
        "--address", address, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "note: --seed is the call's seed (smoothgrad's noise)" in result.stderr
    assert "(--input-seed 9)" in result.stderr
    x = np.random.default_rng(9).standard_normal((1, 3, 28, 28)).astype(np.float32)
    expected = client.attribute("seed-convnet", x, "smoothgrad", index=2, nt_samples=3, seed=5)
    with np.load(tmp_path / "sg.npz") as saved:
        np.testing.assert_array_equal(saved["attribution"], expected.attribution)


def test_a_method_is_required(address: str) -> None:
    result = gradtap("attribute", "seed-convnet", "--index", "1", "--address", address)
    assert result.returncode == 2
    assert "--method" in result.stderr and "Traceback" not in result.stderr


def test_digest_pins_the_model(client: Client, address: str) -> None:
    good = client.describe("seed-convnet").digest
    ok = gradtap(
        "attribute", "seed-convnet", "--method", "saliency", "--index", "1",
        "--digest", good, "--address", address,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    wrong = gradtap(
        "attribute", "seed-convnet", "--method", "saliency", "--index", "1",
        "--digest", "sha256:" + "0" * 64, "--address", address,
    )  # fmt: skip
    assert wrong.returncode == 1
    assert "error: FAILED_PRECONDITION" in wrong.stderr and "field: model.digest" in wrong.stderr
