"""Training curves per epoch from ``metrics.csv`` rows: one run with its stage boundaries (study 1, Fig. 2) or several
runs overlaid (study 5, Fig. 3). Drawn with the figure plumbing of :mod:`cxrkit.eval.plots`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxrkit.eval.plots import as_floats, new_figure, save_figure, styled

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

STAGE_LINE = {"color": "red", "linestyle": "--", "linewidth": 1.2, "gid": "stage-boundary"}


def _column(rows: list[dict], key: str) -> np.ndarray:
    return as_floats([row.get(key) for row in rows])


def _epochs(rows: list[dict]) -> np.ndarray:
    epochs = _column(rows, "epoch")
    return epochs if len(rows) and not np.isnan(epochs).any() else np.arange(1, len(rows) + 1, dtype=float)


def stage_spans(rows: list[dict]) -> list[tuple[str, float, float]]:
    """The stages of one run as ``(name, first epoch, last epoch)``, in order.

    Args:
        rows: ``metrics.csv`` rows; a new stage starts wherever ``stage`` (or ``stage_name``) changes.
    """
    spans: list[tuple[str, float, float]] = []
    key = None
    for row, epoch in zip(rows, _epochs(rows)):
        this = (row.get("stage"), row.get("stage_name"))
        if this != key:
            name = str(row.get("stage_name") or f"stage {row.get('stage') or len(spans) + 1}")
            spans.append((name, epoch, epoch))
            key = this
        else:
            spans[-1] = (spans[-1][0], spans[-1][1], epoch)
    return spans


def _curve_series(rows: list[dict], metric: str) -> list[tuple[str, np.ndarray]]:
    """``[(phase, values)]`` for the train and val columns of ``metric`` (or the column itself) that hold numbers."""
    keys = [(phase, f"{phase}_{metric}") for phase in ("train", "val") if rows and f"{phase}_{metric}" in rows[0]]
    if not keys and rows and metric in rows[0]:
        keys = [("", metric)]
    series = [(phase, _column(rows, key)) for phase, key in keys]
    return [(phase, values) for phase, values in series if not np.isnan(values).all()]  # blank columns: no curve


def _mark_stages(ax: Axes, spans: list[tuple[str, float, float]]) -> int:
    """Draws a red dashed line at each stage boundary and the stage names at the top; returns the line count."""
    if len(spans) < 2:
        return 0
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.14 * (high - low))  # a free band at the top for the stage names
    transform = ax.get_xaxis_transform()  # x in data units, y in axes fraction
    for (_, _, last), (_, first, _) in zip(spans, spans[1:]):
        ax.axvline((last + first) / 2, **STAGE_LINE)
    numbered = len({name for name, _, _ in spans}) < len(spans)  # repeated names: tell the stages apart
    for i, (name, first, last) in enumerate(spans):
        ax.text((first + last) / 2, 0.98, f"{i + 1}: {name}" if numbered else name, transform=transform,
                ha="center", va="top", fontsize=8, color="0.25",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1})
    return len(spans) - 1


@styled
def training_curves_figure(runs: Mapping[str, list[dict]], metrics: Sequence[str] = ("loss", "accuracy"),
                           title: str | None = None) -> Figure:
    """Training curves per epoch: one panel per metric.

    One run: train and val curves, stage boundaries as red dashed lines with the stage names (as study 1's Fig. 2).
    Several runs: one colour per run, solid train, dashed val (as study 5's Fig. 3); stage boundaries are drawn
    only when every run has the same ones.

    Args:
        runs: run name -> ``metrics.csv`` rows (values may be strings or numbers; blanks are gaps).
        metrics: metric names; ``loss`` draws ``train_loss`` and ``val_loss``, a name without train/val columns
            (``lr``) draws that column.
        title: figure title.

    Returns:
        The figure; its stage boundary lines carry the gid ``stage-boundary``.
    """
    fig = new_figure(len(metrics), panel=(5.2, 3.6))
    single = len(runs) == 1
    spans = [stage_spans(rows) for rows in runs.values()]
    shared_spans = spans[0] if spans and all(s == spans[0] for s in spans) else []
    for ax, metric in zip(fig.axes, metrics):
        drawn = 0
        for i, (name, rows) in enumerate(runs.items()):
            epochs = _epochs(rows)
            for j, (phase, values) in enumerate(_curve_series(rows, metric)):
                colour = (f"C{j}" if phase else "C2") if single else f"C{i % 10}"
                style = "-" if single or phase != "val" else "--"
                label = (phase or metric) if single else f"{name} {phase}".strip()
                ax.plot(epochs, values, linestyle=style, color=colour, marker="o", markersize=3, label=label)
                drawn += 1
        _mark_stages(ax, shared_spans)
        if not drawn:
            ax.text(0.5, 0.5, f"no {metric} recorded", transform=ax.transAxes, ha="center", color="0.4")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.xaxis.get_major_locator().set_params(integer=True)
    entries = {label: handle for ax in fig.axes for handle, label in zip(*ax.get_legend_handles_labels())}
    if entries and not single:  # a colour per run, and the line styles once
        from matplotlib.lines import Line2D

        entries = {name: Line2D([], [], color=f"C{i % 10}") for i, name in enumerate(runs)}
        entries.update(train=Line2D([], [], color="0.35"), val=Line2D([], [], color="0.35", linestyle="--"))
    if entries:  # one legend below the panels, where it hides neither curves nor stage names
        fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncols=min(4, len(entries)),
                   frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def plot_training_curves(runs: Mapping[str, list[dict]], path: str | Path,
                         metrics: Sequence[str] = ("loss", "accuracy"), title: str | None = None) -> Path:
    """Writes :func:`training_curves_figure` as a PNG; returns ``path``."""
    return save_figure(training_curves_figure(runs, metrics, title), path)
