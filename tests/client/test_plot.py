"""Pictures: PNGs of the expected size whose pixels follow the attribution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gradtap.client import Client, Objective, Target, plot_attribution

matplotlib_image = pytest.importorskip("matplotlib.image")


def read(path: Path) -> np.ndarray:
    """The PNG's RGB pixels, (height, width, 3) in [0, 1]."""
    pixels = matplotlib_image.imread(path)
    return np.asarray(pixels)[..., :3]


def picture() -> np.ndarray:
    """A (3, 28, 28) image with structure: a bright square on a horizontal ramp."""
    image = np.zeros((3, 28, 28), np.float32)
    image[1] = np.linspace(0.0, 1.0, 28)[None, :]
    image[0, 4:12, 4:12] = 1.0
    return image


def test_importing_the_client_does_not_import_matplotlib() -> None:
    code = "import sys, gradtap.client; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_overlay_is_written_at_the_expected_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    written = plot_attribution(tmp_path / "a.png", rng.standard_normal((3, 28, 28)))
    assert written == tmp_path / "a.png"
    assert read(written).shape == (512, 512, 3)
    plot_attribution(tmp_path / "b.png", rng.standard_normal((28, 14)), size=(333, 217))
    assert read(tmp_path / "b.png").shape == (217, 333, 3)


def test_a_zero_attribution_draws_a_flat_overlay_and_leaves_the_image_alone(
    tmp_path: Path,
) -> None:
    plot_attribution(tmp_path / "zero.png", np.zeros((3, 28, 28)))
    flat = read(tmp_path / "zero.png")
    assert np.ptp(flat.reshape(-1, 3), axis=0).max() == 0
    plot_attribution(tmp_path / "bare.png", np.zeros((3, 28, 28)), image=picture())
    bare = read(tmp_path / "bare.png")
    # With nothing attributed, the picture is the image in gray: its square and ramp show.
    np.testing.assert_array_equal(bare[..., 0], bare[..., 2])
    assert bare[150, 150, 0] > bare[150, 260, 0] + 0.2  # the square: rows and columns 4..12
    assert bare[400, 500, 0] > bare[400, 20, 0] + 0.2  # the ramp, left to right


def test_the_overlay_follows_where_the_attribution_is(tmp_path: Path) -> None:
    image = picture()
    plot_attribution(tmp_path / "bare.png", np.zeros((3, 28, 28)), image=image)
    corner = np.zeros((3, 28, 28))
    corner[:, 20:, 20:] = 1.0  # bottom-right
    plot_attribution(tmp_path / "corner.png", corner, image=image)
    other = np.zeros((3, 28, 28))
    other[:, :8, 16:] = 1.0  # top-right
    plot_attribution(tmp_path / "other.png", other, image=image)
    bare, a, b = (read(tmp_path / f"{n}.png") for n in ("bare", "corner", "other"))
    # Outside the attributed region the image shows unchanged; inside, the heat covers it.
    np.testing.assert_array_equal(a[:360, :], bare[:360, :])
    assert np.abs(a[380:, 380:] - bare[380:, 380:]).mean() > 0.1
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(b[160:, :], bare[160:, :])


def test_vectors_draw_bars_and_layers_draw_channel_grids(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    plot_attribution(tmp_path / "bars.png", rng.standard_normal(784))
    assert read(tmp_path / "bars.png").shape == (400, 800, 3)
    plot_attribution(tmp_path / "grid.png", rng.standard_normal((64, 24, 24)), title="relu_1")
    grid = read(tmp_path / "grid.png")
    assert grid.shape == (800, 800, 3)
    plot_attribution(tmp_path / "grid2.png", rng.standard_normal((64, 24, 24)), title="relu_1")
    assert not np.array_equal(grid, read(tmp_path / "grid2.png"))
    with pytest.raises(ValueError, match="kind must be"):
        plot_attribution(tmp_path / "x.png", np.zeros(3), kind="pie")


def test_result_plot_draws_the_input_gradient_over_the_input(
    client: Client, tmp_path: Path
) -> None:
    x = np.random.default_rng(2).standard_normal((2, 3, 28, 28)).astype(np.float32)
    r = client.analyze(
        "seed-convnet",
        x,
        ["relu_1", Target("conv2", "mean", dims=(0, 2, 3))],
        Objective.logit(3),
        input_grads=True,
    )
    first = r.plot(tmp_path / "row0.png", image=x)
    second = r.plot(tmp_path / "row1.png", image=x, row=1)
    assert read(first).shape == (512, 512, 3)
    assert not np.array_equal(read(first), read(second))
    r.plot(tmp_path / "layer.png", "relu_1", size=(600, 600))
    assert read(tmp_path / "layer.png").shape == (600, 600, 3)
    # A target reduced over the batch has no row to pick: its 64 channel values are bars.
    r.plot(tmp_path / "reduced.png", "conv2")
    assert read(tmp_path / "reduced.png").shape == (400, 800, 3)
    with pytest.raises(ValueError, match="no gradient at 'nope'"):
        r.plot(tmp_path / "nope.png", "nope")


def test_a_token_attribution_is_a_heat_strip_of_continuation_by_prompt_tokens(
    tmp_path: Path,
) -> None:
    from gradtap.client import TokenAttributionResult

    scores = np.zeros((2, 3))
    scores[0, 0], scores[1, 2] = 1.0, -1.0  # the first prompt token raised the first
    result = TokenAttributionResult(  # continuation token; the last lowered the second
        scores=scores,
        values=[-1.0, -2.0],
        prompt=np.array([5, 6, 7]),
        continuation=np.array([8, 9]),
        prompt_tokens=["the", "cat", "sat"],
        continuation_tokens=["on", "mats"],
    )
    pixels = read(result.plot(tmp_path / "tokens.png"))
    assert pixels.shape == (280, 470, 3)  # it grows with the tokens: 90 px a prompt token
    cells = pixels[:, : int(0.78 * pixels.shape[1])]  # the strip, left of the color bar
    red = cells[..., 0] > cells[..., 2] + 0.2
    blue = cells[..., 2] > cells[..., 0] + 0.2
    assert red.any() and blue.any()
    red_y, red_x = np.argwhere(red).mean(axis=0)
    blue_y, blue_x = np.argwhere(blue).mean(axis=0)
    assert red_x < blue_x and red_y < blue_y  # top-left positive, bottom-right negative
    with pytest.raises(ValueError, match="need 2 rows and 3 columns"):
        TokenAttributionResult(
            scores=np.zeros((2, 4)), values=[], prompt=np.arange(3), continuation=np.arange(2)
        ).plot(tmp_path / "bad.png")
