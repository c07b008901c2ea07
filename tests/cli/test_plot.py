"""--plot: analyze and attribute draw their result by the same picture rules (docs/plots.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .running import gradtap

matplotlib_image = pytest.importorskip("matplotlib.image")


def read(path: Path) -> np.ndarray:
    return np.asarray(matplotlib_image.imread(path))[..., :3]


def test_cli_analyze_writes_a_plot(address: str, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(3).standard_normal((1, 3, 28, 28)))
    result = gradtap(
        "analyze", "seed-convnet", "--address", address, "--input", str(tmp_path / "x.npy"),
        "--objective", "logit:3", "--input-grads", "--plot", str(tmp_path / "saliency.png"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"wrote a picture to {tmp_path / 'saliency.png'}" in result.stdout
    assert read(tmp_path / "saliency.png").shape == (512, 512, 3)


def test_cli_attribute_writes_a_plot_over_the_input_or_of_the_nodes_channels(
    address: str, tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(4).standard_normal((1, 3, 28, 28)))
    saliency = gradtap(
        "attribute", "seed-convnet", "--method", "saliency", "--index", "3", "-i", "x.npy",
        "--plot", "saliency.png", "--address", address, cwd=tmp_path,
    )  # fmt: skip
    assert saliency.returncode == 0, saliency.stderr
    assert f"wrote a picture to {Path('saliency.png')}" in saliency.stdout
    assert read(tmp_path / "saliency.png").shape == (512, 512, 3)  # an overlay, as analyze's
    layer = gradtap(
        "attribute", "seed-convnet", "--method", "layer_gradient_x_activation", "--index", "3",
        "--node", "relu_1", "-i", "x.npy", "--plot", "relu_1.png", "--address", address,
        cwd=tmp_path,
    )  # fmt: skip
    assert layer.returncode == 0, layer.stderr
    assert read(tmp_path / "relu_1.png").shape == (800, 800, 3)  # 64 channel maps


def test_a_picture_that_cannot_be_drawn_is_a_usage_error(address: str, tmp_path: Path) -> None:
    result = gradtap(
        "analyze", "seed-convnet", "--objective", "logit:3", "--plot", "x.png",
        "--address", address, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "nothing to draw" in result.stderr
