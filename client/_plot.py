"""PNG pictures of attributions and gradients; matplotlib is imported here, lazily, and only here.

Three kinds of picture, chosen from the array's shape unless asked for:
- "overlay": an image-shaped array (H, W) or (C, H, W) with C <= 4, e.g. an input gradient.
  Its strength, sum over channels of |value| scaled to [0, 1], is drawn as a heatmap whose
  opacity follows the strength, over the input image in gray when one is given (as Captum's
  blended heat maps do): where the attribution is zero the gray image shows unchanged, and a
  zero attribution draws a flat picture (without an image) or the bare gray image.
- "bars": a vector (F,): one signed bar per feature.
- "channels": a layer gradient (C, H, W) with C > 4: a grid of channel maps on one
  symmetric color scale (red positive, blue negative).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KINDS = ("overlay", "bars", "channels")
DPI = 100
_DEFAULT_SIZES = {"bars": (800, 400), "channels": (800, 800)}
_OVERLAY_SIDE = 512
_HEAT_OPACITY = 0.7


def _figure(size: tuple[int, int]) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError('plots need matplotlib: pip install "gradtap[plot]"') from None
    width, height = size
    if width < 16 or height < 16:
        raise ValueError("size must be at least 16 x 16 pixels")
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def default_kind(array: np.ndarray) -> str:
    """The kind of picture an array's shape calls for (see the module docstring)."""
    if array.ndim == 1:
        return "bars"
    if array.ndim == 2 or (array.ndim == 3 and array.shape[0] <= 4):
        return "overlay"
    if array.ndim == 3:
        return "channels"
    raise ValueError(
        f"cannot picture an array of shape {array.shape}: give one example, (F,), (H, W) or "
        "(C, H, W) (a Result's arrays: pick a row)"
    )


def _unit(array: np.ndarray) -> np.ndarray:
    """Scaled to [0, 1] by its min and max; mid-gray when constant."""
    low, high = float(array.min()), float(array.max())
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        return np.full(array.shape, 0.5)
    return (array - low) / (high - low)


def _gray(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An input image in gray, (H, W, 3) in [0, 1], from (H, W), (C, H, W) or (H, W, C)."""
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 3 and a.shape[1:] == (height, width):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2 and a.shape == (height, width):
        a = a[..., None]
    if a.ndim != 3 or a.shape[:2] != (height, width) or a.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"image of shape {image.shape} does not match an attribution of {height} x {width}"
        )
    gray = _unit(a[..., :3].mean(axis=2))
    return np.repeat(gray[..., None], 3, axis=2)


def overlay_pixels(
    attribution: np.ndarray, image: np.ndarray | None = None, cmap: str = "inferno"
) -> np.ndarray:
    """The overlay's (H, W, 3) pixels in [0, 1]: the heatmap blended over the image."""
    from matplotlib import colormaps

    a = np.asarray(attribution, dtype=np.float64)
    strength = np.abs(a).sum(axis=0) if a.ndim == 3 else np.abs(a)
    peak = float(strength.max()) if strength.size else 0.0
    heat = strength / peak if peak > 0 and math.isfinite(peak) else np.zeros_like(strength)
    colors = colormaps[cmap](heat)[..., :3]
    if image is None:
        return np.asarray(colors, dtype=np.float64)
    base = _gray(image, *heat.shape)
    alpha = (_HEAT_OPACITY * heat)[..., None]
    return np.asarray(base * (1 - alpha) + colors * alpha, dtype=np.float64)


def plot(
    path: str | os.PathLike[str],
    attribution: Any,
    *,
    image: Any = None,
    kind: str | None = None,
    size: tuple[int, int] | None = None,
    title: str | None = None,
    max_channels: int = 64,
) -> Path:
    """Writes a PNG picture of one example's attribution or gradient; needs matplotlib.

    Args:
        path: where to write the PNG.
        attribution: one example's array, without a batch dimension: (F,), (H, W) or
            (C, H, W). bfloat16 and float16 arrays are fine.
        image: the example's input, (H, W), (C, H, W) or (H, W, C), drawn under an
            "overlay"; ignored by the other kinds.
        kind: "overlay", "bars" or "channels"; by default chosen from the shape.
        size: (width, height) of the PNG in pixels. Default: an overlay's longer side is
            512 pixels; bars are 800 x 400 and channel grids 800 x 800.
        title: a title drawn on the picture.
        max_channels: most channel maps a "channels" grid shows (the first ones).

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is not installed (pip install "gradtap[plot]").
        ValueError: a shape the kind cannot draw.
    """
    a = np.asarray(attribution)
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32)  # ml_dtypes.bfloat16
    a = a.astype(np.float64)
    kind = kind or default_kind(a)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "overlay" and a.ndim not in (2, 3):
        raise ValueError(f"an overlay needs (H, W) or (C, H, W), not {a.shape}")
    if kind == "channels" and a.ndim != 3:
        raise ValueError(f"a channel grid needs (C, H, W), not {a.shape}")
    if kind == "bars" and a.ndim != 1:
        a = a.reshape(-1)
    if size is None:
        if kind == "overlay":
            height, width = a.shape[-2:]
            scale = _OVERLAY_SIDE / max(height, width)
            size = (max(16, round(width * scale)), max(16, round(height * scale)))
        else:
            size = _DEFAULT_SIZES[kind]
    figure = _figure(size)
    if kind == "overlay":
        pixels = overlay_pixels(a, None if image is None else np.asarray(image))
        axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
        axes.imshow(pixels, interpolation="nearest", aspect="auto")
        axes.set_axis_off()
        if title:
            figure.text(0.5, 0.98, title, ha="center", va="top", color="white", fontsize=11)
    elif kind == "bars":
        axes = figure.add_subplot()
        colors = np.where(a >= 0, "tab:red", "tab:blue")
        axes.bar(np.arange(a.size), a, width=1.0, color=colors)
        axes.axhline(0.0, color="black", linewidth=0.5)
        axes.set_xlabel("feature")
        axes.set_ylabel("value")
        axes.set_xlim(-0.5, a.size - 0.5)
        if title:
            axes.set_title(title)
    else:
        _channels(figure, a[:max_channels], title)
    out = Path(path)
    figure.savefig(out, dpi=DPI, format="png")
    return out


def _channels(figure: Figure, maps: np.ndarray, title: str | None) -> None:
    count = maps.shape[0]
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    peak = float(np.abs(maps).max()) if maps.size else 0.0
    peak = peak if peak > 0 and math.isfinite(peak) else 1.0
    grid = figure.subplots(rows, cols, squeeze=False)
    for i, axes in enumerate(grid.flat):
        axes.set_axis_off()
        if i < count:
            axes.imshow(maps[i], cmap="RdBu_r", vmin=-peak, vmax=peak, interpolation="nearest")
            axes.set_title(str(i), fontsize=7, pad=2)
    if title:
        figure.suptitle(title)


def plot_row(
    path: str | os.PathLike[str],
    array: np.ndarray,
    *,
    batched: bool,
    node: bool,
    image: Any = None,
    row: int = 0,
    kind: str | None = None,
    size: tuple[int, int] | None = None,
    title: str | None = None,
) -> Path:
    """The picture rules of Result.plot and AttributionResult.plot: one batch row of a
    returned array (the whole array when it has no batch dimension), over the same row of
    `image`; a node's array with three dimensions per row is drawn as its channels."""
    if batched and array.ndim > 0:
        if not -array.shape[0] <= row < array.shape[0]:
            raise ValueError(f"row {row} is outside the batch of {array.shape[0]}")
        array = array[row]
    if image is not None:
        image = np.asarray(image)
        if image.ndim == array.ndim + 1:
            image = image[row]
    if kind is None:
        kind = "channels" if node and array.ndim == 3 else default_kind(np.asarray(array))
    return plot(path, array, image=image, kind=kind, size=size, title=title)


def plot_tokens(
    path: str | os.PathLike[str],
    scores: np.ndarray,
    prompt: list[str],
    continuation: list[str],
    *,
    size: tuple[int, int] | None = None,
    title: str | None = None,
) -> Path:
    """The picture of TokenAttributionResult.plot: a heat strip per continuation token
    (rows) over the prompt tokens (columns), on one symmetric color scale (red positive,
    blue negative), each cell labelled with its score."""
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != len(prompt) or a.shape[0] != len(continuation):
        raise ValueError(
            f"scores of shape {a.shape} need {len(continuation)} rows and {len(prompt)} columns"
        )
    if size is None:
        size = (max(400, 90 * a.shape[1] + 200), max(200, 60 * a.shape[0] + 160))
    figure = _figure(size)
    axes = figure.add_subplot()
    bound = float(np.abs(a).max()) or 1.0
    shown = axes.imshow(a, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    axes.set_xticks(np.arange(a.shape[1]), prompt, rotation=45, ha="right", fontsize=9)
    axes.set_yticks(np.arange(a.shape[0]), continuation, fontsize=9)
    axes.set_xlabel("prompt token")
    axes.set_ylabel("continuation token")
    if a.size <= 400:
        for (k, p), value in np.ndenumerate(a):
            strong = abs(value) > 0.6 * bound
            axes.text(
                p,
                k,
                f"{value:.2g}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if strong else "black",
            )
    figure.colorbar(shown, ax=axes)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    out = Path(path)
    figure.savefig(out, dpi=DPI, format="png")
    return out
