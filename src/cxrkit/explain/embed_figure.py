"""The feature-map scatter: one colour per true class, dots for correct predictions, triangles for mistakes.

Drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas and the style of :mod:`cxrkit.eval.plots`, so
nothing touches pyplot's global state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrkit.eval.plots import new_figure, styled
from cxrkit.explain.embed import METHODS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CORRECT_MARKER = "o"
WRONG_MARKER = "^"


def embedding_titles(summary: Mapping[str, Any]) -> tuple[str, str]:
    """The title (what is mapped) and subtitle (separability and sampling) of a map, from its JSON summary."""
    method = METHODS.get(summary["method"], summary["method"])
    about = f" · {summary['label']}" if summary.get("label") else ""
    details = ["head input"] if summary.get("module") == "backbone" else []
    details.append(f"{summary['feature_dim']}-d")
    if summary.get("pool") not in (None, "none"):
        details.append(f"{summary['pool']}-pooled")
    title = f"{summary['dataset']} {summary['split']}{about}: {summary['layer']} ({', '.join(details)}) · {method}"
    score = summary.get("knn_balanced_accuracy")
    knn = "5-NN balanced accuracy n/a (needs 2 patients and 2 classes)" if score is None else (
        f"5-NN balanced accuracy {score:.3f} (chance {summary['knn']['chance']:.2f}, patient-grouped CV)")
    if summary.get("sampled"):
        points = f"sampled {summary['n_sampled']} of {summary['n_total']} images (seed {summary['seed']})"
    else:
        points = f"all {summary['n_total']} images"
    return title, f"{knn}\n{points}, {summary['run']} ({summary['checkpoint']})"


@styled
def embedding_figure(xy: np.ndarray, true: np.ndarray, correct: np.ndarray, class_names: Sequence[str],
                     title: str = "", subtitle: str = "", axis_name: str = "dimension") -> Figure:
    """A 2-D map of images coloured by true class; misclassified images are larger triangles with a dark edge.

    Args:
        xy: coordinates ``[n, 2]``.
        true: class index per point (into ``class_names``).
        correct: whether each point's prediction was right.
        class_names: class names, in index order.
        title: the figure's title.
        subtitle: smaller text under the title (may hold a newline).
        axis_name: the projection's name for the axis labels (``t-SNE 1``).

    Returns:
        The figure; correct points of each class are one collection drawn with ``"o"``, mistakes one with ``"^"``
        drawn on top.
    """
    import matplotlib

    xy, true, correct = np.asarray(xy, dtype=float), np.asarray(true), np.asarray(correct, dtype=bool)
    fig = new_figure(1, panel=(7.4, 5.6))
    ax = fig.axes[0]
    cmap = matplotlib.colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    small = 14 if len(xy) <= 1000 else 8
    dots, triangles = [], {}
    for k, name in enumerate(class_names):
        ok = (true == k) & correct
        dots.append(ax.scatter(xy[ok, 0], xy[ok, 1], s=small, marker=CORRECT_MARKER, color=cmap(k % cmap.N),
                               alpha=0.55, linewidths=0, label=f"{name}: {int(ok.sum())} correct"))
    for k, name in enumerate(class_names):  # after all dots, so no mistake hides under another class
        wrong = (true == k) & ~correct
        if wrong.any():
            triangles[k] = ax.scatter(
                xy[wrong, 0], xy[wrong, 1], s=small * 3.5, marker=WRONG_MARKER, color=cmap(k % cmap.N),
                edgecolors="0.1", linewidths=0.6, alpha=0.9, label=f"{name}: {int(wrong.sum())} misclassified")
    handles = [h for k, dot in enumerate(dots) for h in (dot, triangles.get(k)) if h is not None]
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.set_xlabel(f"{axis_name} 1")
    ax.set_ylabel(f"{axis_name} 2")
    ax.set_title(subtitle, fontsize=8, color="0.3", loc="left")
    fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.legend(handles=handles, loc="outside right upper", title="true class", frameon=False, markerscale=1.3)
    return fig


__all__ = ["CORRECT_MARKER", "WRONG_MARKER", "embedding_figure", "embedding_titles"]
