"""Heatmap figures: one overlay per image, and study 3's grid laid out like a confusion matrix.

A heatmap is computed over the model input; :func:`~cxrkit.data.transforms.input_box` says which part of the
original image that input shows, and the map is drawn over that box of the original image at its own aspect ratio
(matplotlib's ``extent`` does the resampling), so nothing is squashed for display.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrkit.eval.plots import new_figure, save_figure, styled

DISPLAY_SIDE = 1024  # longest side of an image as drawn; larger originals are shown downscaled
CMAP = "jet"


@dataclass
class Explained:
    """One image's heatmap for one class, with what the figure says about it.

    Attributes:
        image: the original image (PIL, as decoded: EXIF-rotated, 8-bit ``L`` or ``RGB``).
        heatmap: ``[h, w]`` in [0, 1] over the model input.
        box: ``(left, top, right, bottom)`` of the original image that the model input shows.
        label: the explained class.
        probability: its calibrated probability.
        predicted: the run's decision for the image.
        title: first line of the figure title (file name or the true class).
        faithfulness: text for the faithfulness check, or None when it was not run.
        check: the check's numbers (see :meth:`~cxrkit.explain.faithfulness.Faithfulness.to_dict`).
    """

    image: Any
    heatmap: np.ndarray
    box: tuple[float, float, float, float]
    label: str
    probability: float
    predicted: str
    title: str
    faithfulness: str | None = None
    check: dict[str, Any] = field(default_factory=dict)


def _display(image: Any, side: int) -> tuple[np.ndarray, float]:
    """The image as an array no larger than ``side`` on its longest side, and the scale applied."""
    scale = min(1.0, side / max(image.size))
    if scale < 1.0:
        from PIL import Image

        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    return np.asarray(image), scale


def _draw(ax: Any, item: Explained, opacity: float, side: int) -> Any:
    pixels, scale = _display(item.image, side)
    height, width = pixels.shape[:2]
    # both in pixel-edge coordinates (the box's): by default imshow centres pixel i on i, half a pixel off the box
    ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255, interpolation="antialiased",
              extent=(0, width, height, 0))
    left, top, right, bottom = (v * scale for v in item.box)
    shown = ax.imshow(item.heatmap, cmap=CMAP, alpha=opacity, vmin=0.0, vmax=1.0, extent=(left, right, bottom, top),
                      interpolation="bilinear")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    return shown


def _opaque(shown: Any) -> Any:
    """A colour bar source with the heatmap's colours at full opacity (the overlay itself is translucent)."""
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=shown.norm, cmap=shown.get_cmap())


@styled
def overlay_figure(item: Explained, method: str, layer: str, opacity: float = 0.45) -> Any:
    """The heatmap over the original image, with a colour bar and the class, probability and check in the title."""
    width, height = item.image.size
    panel = 6.0
    fig = new_figure(1, panel=(panel * min(1.6, max(0.6, width / height)) + 1.0, panel + 0.6))
    ax = fig.axes[0]
    shown = _draw(ax, item, opacity, DISPLAY_SIDE)
    fig.colorbar(_opaque(shown), ax=ax, fraction=0.046, pad=0.02, label=f"{method} relevance (0-1)")
    lines = [item.title,
             f"{item.label} p={item.probability:.3f} (predicted {item.predicted or 'no label'}) · {method} at {layer}"]
    if item.faithfulness:
        lines.append(item.faithfulness)
    ax.set_title("\n".join(lines), fontsize=9)
    return fig


def plot_overlay(item: Explained, method: str, layer: str, path: str | Path, opacity: float = 0.45) -> Path:
    """Writes :func:`overlay_figure` as a PNG."""
    return save_figure(overlay_figure(item, method, layer, opacity), path)


@dataclass
class GridCell:
    """One (true, predicted) cell of the grid: how many images fall in it and the examples shown."""

    true: str
    predicted: str
    count: int
    examples: list[Explained]


@styled
def grid_figure(labels: Sequence[str], cells: dict[tuple[str, str], GridCell], per_cell: int, method: str,
                title: str, opacity: float = 0.45, row_name: str = "true", column_name: str = "predicted") -> Any:
    """Study 3's figure: rows are true classes, columns predicted classes, each cell a few example overlays.

    Cells on the diagonal (correct) are framed green, the others red; each cell's middle example is titled with
    the number of images in that cell.
    """
    n = len(labels)
    fig = new_figure(n * n * per_cell, ncols=n * per_cell, panel=(2.3, 2.5))
    axes = np.asarray(fig.axes).reshape(n, n * per_cell)
    shown, middle = None, per_cell // 2
    for r, true in enumerate(labels):
        for c, predicted in enumerate(labels):
            cell = cells.get((true, predicted), GridCell(true, predicted, 0, []))
            colour = "#2e7d32" if true == predicted else "#c62828"
            for k in range(per_cell):
                ax = axes[r, c * per_cell + k]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_color(colour)
                    spine.set_linewidth(2.5)
                if k < len(cell.examples):
                    item = cell.examples[k]
                    shown = _draw(ax, item, opacity, 384)
                    head = f"n={cell.count}\n" if k == middle else "\n"
                    ax.set_title(f"{head}p={item.probability:.2f}", fontsize=8, color=colour)
                else:
                    ax.text(0.5, 0.5, "none" if cell.count == 0 and k == middle else "", ha="center", va="center",
                            transform=ax.transAxes, color="#777777")
                    ax.set_title(f"n={cell.count}\n" if k == middle else "\n", fontsize=8, color=colour)
                if c == 0 and k == 0:
                    ax.set_ylabel(f"{row_name}: {true}", fontsize=9)
                if r == n - 1 and k == middle:
                    ax.set_xlabel(f"{column_name}: {predicted}", fontsize=9)
    if shown is not None:
        fig.colorbar(_opaque(shown), ax=fig.axes, fraction=0.02, pad=0.01, label=f"{method} relevance")
    fig.suptitle(title, fontsize=10)
    return fig


__all__ = ["Explained", "GridCell", "grid_figure", "overlay_figure", "plot_overlay"]
