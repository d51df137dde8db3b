"""PNG figures of evaluation, and the figure plumbing shared with :mod:`cxrkit.eval.curves` (training curves).

matplotlib is used only in these two modules, without pyplot, so there is no global figure state.

Each figure has a builder that returns a :class:`matplotlib.figure.Figure` (``*_figure``, for tests and for callers
that want to adjust it) and a ``plot_*`` function that saves it as a PNG and returns the path. Figures are drawn on
``Figure`` objects with the Agg canvas, so nothing is registered with pyplot and nothing needs a display.

Targets and probabilities follow :func:`cxrkit.eval.metrics.compute_metrics`: binary / multiclass ``y_true`` holds
class indices ``[n]`` and ``probs`` softmax rows ``[n, labels]``; multilabel ``y_true`` is ``[n, labels]`` with 0, 1
or NaN (unknown, left out) and ``probs`` holds sigmoid outputs.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrkit.console import notes_console, quiet_logger

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 120
CHANCE_LINE = {"color": "0.6", "linestyle": ":", "linewidth": 1.0, "label": "chance"}
_STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "axes.grid": True,
    "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False, "figure.facecolor": "white",
}


# Fonts that draw what DejaVu Sans (matplotlib's own) lacks, such as Chinese, Japanese or Korean class names; those
# installed follow it in the figures' font list, and matplotlib takes each character from the first that has it.
FALLBACK_FONTS = (
    "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR", "Source Han Sans",
    "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "Microsoft YaHei", "Yu Gothic", "MS Gothic",
    "Malgun Gothic", "PingFang SC", "Hiragino Sans", "Arial Unicode MS", "Noto Sans", "Noto Sans Arabic",
    "Noto Sans Hebrew", "Noto Sans Devanagari", "Noto Sans Thai",
)
_GLYPH_MISSING = re.compile(r"Glyph (\d+) .*missing from font")
_noted_missing: set[str] = set()  # characters already in a note, said once per process


@functools.cache
def font_families() -> tuple[str, ...]:
    """DejaVu Sans, then the :data:`FALLBACK_FONTS` installed on this machine."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return ("DejaVu Sans", *(name for name in FALLBACK_FONTS if name in installed))


def new_figure(n_panels: int, ncols: int | None = None, panel: tuple[float, float] = (4.6, 3.6)) -> Figure:
    """A Figure with ``n_panels`` axes in a grid, on an Agg canvas, in the module's style."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(n_panels, ncols or n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    for i in range(n_panels):
        fig.add_subplot(nrows, ncols, i + 1)
    return fig


def styled(build: Callable[..., Figure]) -> Callable[..., Figure]:
    """Runs a figure builder with the module's rc style in effect (restored afterwards)."""

    @functools.wraps(build)
    def styled(*args: Any, **kwargs: Any) -> Figure:
        import matplotlib

        # without matplotlib's log lines about a fallback font's weights ("findfont: Failed to find font weight")
        with matplotlib.rc_context({**_STYLE, "font.family": list(font_families())}), \
                quiet_logger("matplotlib.font_manager"):
            return build(*args, **kwargs)

    return styled


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Saves ``fig`` as a PNG at :data:`DPI`, atomically; returns the path."""
    from cxrkit.runs import atomic_write

    path = Path(path)
    with warnings.catch_warnings(record=True) as caught, quiet_logger("matplotlib.font_manager"):
        warnings.simplefilter("always")
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI, facecolor="white"))
    missing = set()
    for warning in caught:
        if found := _GLYPH_MISSING.search(str(warning.message)):
            missing.add(chr(int(found.group(1))))
        else:  # not ours to hide
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if missing - _noted_missing:  # one note, not matplotlib's warning per character and figure
        _noted_missing.update(missing)
        notes_console().print(f"note: no installed font draws {''.join(sorted(missing))}, so figures show boxes in "
                              "their place; install a font that has them (such as Noto Sans CJK)", highlight=False)
    return path


def as_floats(values: Sequence[Any]) -> np.ndarray:
    """Numbers from numbers or strings; blanks, ``None`` and junk become NaN."""

    def number(value: Any) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan

    return np.array([number(v) for v in values], dtype=float)


def _one_vs_rest(task: str, labels: Sequence[str], y_true: np.ndarray,
                 probs: np.ndarray) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yields ``(label, is_positive, scores)`` per scored label (binary: the positive class only)."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.float64)
    columns = [1] if task == "binary" else range(len(labels))
    for j in columns:
        if task == "multilabel":
            known = ~np.isnan(y[:, j])
            yield str(labels[j]), y[known, j] == 1, probs[known, j]
        else:
            yield str(labels[j]), y == j, probs[:, j]


def _no_curves(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"{what} undefined: a class is missing", transform=ax.transAxes, ha="center", color="0.4")


MANY_CURVES = 10  # more than the default colour cycle (tab10) tells apart


def curve_styles(n: int) -> list[dict[str, Any]]:
    """A colour and line style for each of ``n`` curves, no two alike.

    Up to :data:`MANY_CURVES`, matplotlib's default cycle (``C0``...``C9``, solid). Beyond, the qualitative ``tab20``
    map, its ten strong colours first and then their ten light ones, so that the first ten curves keep the colours of
    the default cycle; past 20 curves the line style changes too.
    """
    if n <= MANY_CURVES:
        return [{"color": f"C{i}", "linestyle": "-"} for i in range(n)]
    from matplotlib import colormaps

    tab20 = colormaps["tab20"].colors
    colours, line_styles = tab20[0::2] + tab20[1::2], ("-", "--", "-.", ":")
    return [{"color": colours[i % len(colours)], "linestyle": line_styles[i // len(colours) % len(line_styles)]}
            for i in range(n)]


def _styled_curves(task: str, labels: Sequence[str], y_true: np.ndarray,
                   probs: np.ndarray) -> tuple[list[tuple[str, np.ndarray, np.ndarray, dict[str, Any]]], bool]:
    """:func:`_one_vs_rest` with each curve's style, and whether there are more curves than :data:`MANY_CURVES`."""
    curves = list(_one_vs_rest(task, labels, y_true, probs))
    styles = curve_styles(len(curves))
    return [(*curve, style) for curve, style in zip(curves, styles)], len(curves) > MANY_CURVES


def _missing_class(positive: np.ndarray) -> str:
    """Why a label has no curve: which class its known entries lack."""
    if not positive.size:
        return "no known entries"
    return "no negatives" if positive.all() else "no positives"


def _undrawn(ax: Axes, text: str) -> None:
    """A legend entry without a curve (and without a line in the legend), so that every label is listed."""
    ax.plot([], [], linestyle="none", label=text)


@styled
def roc_figure(task: str, labels: Sequence[str], y_true: np.ndarray, probs: np.ndarray) -> Figure:
    """ROC curves with the AUC in the legend and the chance diagonal.

    Binary: the positive class (``labels[1]``); multiclass: one-vs-rest per class plus the macro average (mean of
    the interpolated curves; its AUC is the mean of the per-class AUCs, as in ``metrics.json``); multilabel: one
    curve per label over its known entries. A label with a single class present has no curve; the legend lists it
    with what it lacks (``Hernia (no positives, AUC n/a)``). With more than :data:`MANY_CURVES` curves the colours
    come from :func:`curve_styles` and the legend stands beside the axes.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    curves, many = _styled_curves(task, labels, y_true, probs)
    fig = new_figure(1, panel=(7.6 if many else 5.4, 4.6))
    ax = fig.axes[0]
    grid, tprs, aucs = np.linspace(0, 1, 201), [], []
    for label, positive, scores, style in curves:
        if positive.all() or not positive.any():  # AUC undefined
            _undrawn(ax, f"{label} ({_missing_class(positive)}, AUC n/a)")
            continue
        fpr, tpr, _ = roc_curve(positive, scores)
        aucs.append(roc_auc_score(positive, scores))
        tprs.append(np.interp(grid, fpr, tpr))
        ax.plot(fpr, tpr, linewidth=1.6, label=f"{label} (AUC {aucs[-1]:.3f})", **style)
    if task == "multiclass" and len(aucs) > 1:
        ax.plot(grid, np.mean(tprs, axis=0), color="black", linestyle="--", linewidth=2,
                label=f"macro (AUC {np.mean(aucs):.3f})")
    if not aucs:
        _no_curves(ax, "ROC")
    ax.plot([0, 1], [0, 1], **CHANCE_LINE)
    _square(ax, "false positive rate (1 - specificity)", "true positive rate (sensitivity)", "ROC")
    _legend(ax, "lower right", beside=many)
    return fig


def _square(ax: Axes, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def _legend(ax: Axes, loc: str, beside: bool) -> None:
    """The legend in a corner of the axes, or beside them in a smaller font (``beside``), where a long list of
    labels would otherwise cover the curves."""
    if beside:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
    else:
        ax.legend(loc=loc)


def plot_roc(task: str, labels: Sequence[str], y_true: np.ndarray, probs: np.ndarray, path: str | Path) -> Path:
    """Writes :func:`roc_figure` as a PNG; returns ``path``."""
    return save_figure(roc_figure(task, labels, y_true, probs), path)


@styled
def precision_recall_figure(task: str, labels: Sequence[str], y_true: np.ndarray, probs: np.ndarray) -> Figure:
    """Precision-recall curves with the average precision (AP) in the legend.

    Same curves, colours and legend as :func:`roc_figure`; a label without positives is listed as ``(no positives,
    AP n/a)``. The binary plot adds the prevalence line (the precision of chance).
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve

    curves, many = _styled_curves(task, labels, y_true, probs)
    fig = new_figure(1, panel=(7.6 if many else 5.4, 4.6))
    ax = fig.axes[0]
    drawn = 0
    for label, positive, scores, style in curves:
        if not positive.any():
            _undrawn(ax, f"{label} ({_missing_class(positive)}, AP n/a)")
            continue
        precision, recall, _ = precision_recall_curve(positive, scores)
        ap = average_precision_score(positive, scores)
        ax.step(recall, precision, where="post", linewidth=1.6, label=f"{label} (AP {ap:.3f})", **style)
        drawn += 1
        if task == "binary":
            ax.axhline(positive.mean(), **{**CHANCE_LINE, "label": f"chance (prevalence {positive.mean():.2f})"})
    if not drawn:
        _no_curves(ax, "precision-recall")
    _square(ax, "recall (sensitivity)", "precision (PPV)", "Precision-recall")
    _legend(ax, "lower left", beside=many)
    return fig


def plot_precision_recall(task: str, labels: Sequence[str], y_true: np.ndarray, probs: np.ndarray,
                          path: str | Path) -> Path:
    """Writes :func:`precision_recall_figure` as a PNG; returns ``path``."""
    return save_figure(precision_recall_figure(task, labels, y_true, probs), path)


def _row_normalized(matrix: np.ndarray) -> np.ndarray:
    sums = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, sums, out=np.zeros_like(matrix, dtype=float), where=sums > 0)


def _matrix_panel(ax: Axes, labels: Sequence[str], values: np.ndarray, text: list[list[str]], title: str) -> None:
    """One annotated heat map; rows are the true class, columns the predicted one."""
    ax.grid(False)
    ax.spines[:].set_visible(True)
    ax.imshow(values, cmap="Blues", vmin=0, vmax=max(float(values.max()), 1e-9))
    size = 9 if len(labels) <= 6 else 7
    for i, row in enumerate(text):
        for j, cell in enumerate(row):
            dark = values[i, j] > 0.55 * values.max()
            ax.text(j, i, cell, ha="center", va="center", fontsize=size, color="white" if dark else "black")
    ticks = range(len(labels))
    long = max(len(str(label)) for label in labels) > 6
    ax.set_xticks(ticks, [str(label) for label in labels], rotation=40 if long else 0, ha="right" if long else "center")
    ax.set_yticks(ticks, [str(label) for label in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)


@styled
def confusion_matrix_figure(labels: Sequence[str], matrix: Any, normalized: Any = None) -> Figure:
    """Confusion matrices with annotated cells.

    Args:
        labels: label names.
        matrix: single-label: a ``[k, k]`` count matrix (rows true, columns predicted). Multilabel: label name ->
            ``[[tn, fp], [fn, tp]]`` (as ``metrics.json``); drawn as a grid of 2x2 matrices, one per label, each
            cell giving the count and the row share.
        normalized: the row-normalised matrix (or dict of them); computed from ``matrix`` when ``None``.
    """
    if isinstance(matrix, Mapping):
        names = [str(label) for label in labels if str(label) in matrix]
        fig = new_figure(len(names), ncols=4, panel=(2.9, 2.7))
        for ax, name in zip(fig.axes, names):
            counts = np.asarray(matrix[name], dtype=float)
            shares = _row_normalized(counts)
            text = [[f"{int(c)}\n{s:.0%}" for c, s in zip(crow, srow)] for crow, srow in zip(counts, shares)]
            _matrix_panel(ax, ["neg", "pos"], shares, text, name)
        return fig
    counts = np.asarray(matrix, dtype=float)
    shares = _row_normalized(counts) if normalized is None else np.asarray(normalized, dtype=float)
    side = max(4.2, 0.55 * len(labels) + 2.2)
    fig = new_figure(2, panel=(side, side * 0.9))
    _matrix_panel(fig.axes[0], labels, counts, [[f"{int(v)}" for v in row] for row in counts], "Counts")
    _matrix_panel(fig.axes[1], labels, shares, [[f"{v:.2f}" for v in row] for row in shares],
                  "Row-normalized (recall on the diagonal)")
    return fig


def plot_confusion_matrix(labels: Sequence[str], matrix: Any, path: str | Path, normalized: Any = None) -> Path:
    """Writes :func:`confusion_matrix_figure` as a PNG; returns ``path``."""
    return save_figure(confusion_matrix_figure(labels, matrix, normalized), path)


@styled
def reliability_figure(curve: Mapping[str, Any], ece: float | None = None) -> Figure:
    """Reliability diagram: accuracy against mean confidence per bin, the diagonal and a histogram of the counts.

    Args:
        curve: ``kind``, ``confidence``, ``accuracy``, ``count`` (one value per bin; empty bins may be ``None``)
            and ``edges`` (bins + 1 values), as from :func:`cxrkit.eval.calibration.reliability_curve`.
        ece: expected calibration error, shown in the title when given.
    """
    edges = np.asarray(curve["edges"], dtype=float)
    confidence, accuracy = as_floats(curve["confidence"]), as_floats(curve["accuracy"])
    counts = np.nan_to_num(as_floats(curve["count"]))
    centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig = new_figure(2, ncols=1, panel=(5.0, 2.6))
    top, bottom = fig.axes
    fig.axes[0].get_gridspec().set_height_ratios([2.3, 1])
    filled = counts > 0
    top.bar(centres[filled], accuracy[filled], width=widths[filled] * 0.95, color="C0", alpha=0.75,
            edgecolor="C0", label="observed in bin")
    top.plot(confidence[filled], accuracy[filled], "o-", color="C1", markersize=4, label="at mean confidence")
    top.plot([0, 1], [0, 1], **{**CHANCE_LINE, "label": "perfect calibration"})
    top.set_xlim(edges[0], edges[-1])
    top.set_ylim(0, 1.02)
    positive = curve.get("kind") == "positive"
    top.set_ylabel("observed frequency of positives" if positive else "observed accuracy")
    kind = f" ({curve['kind']})" if curve.get("kind") else ""
    top.set_title(f"Reliability{kind}" + (f", ECE = {ece:.3f}" if isinstance(ece, (int, float)) else ""))
    top.legend(loc="upper left")
    bottom.bar(centres, counts, width=widths * 0.95, color="0.55")
    bottom.set_xlim(edges[0], edges[-1])
    bottom.set_xlabel("predicted probability" if positive else "predicted confidence (top label)")
    bottom.set_ylabel("images")
    return fig


def plot_reliability(curve: Mapping[str, Any], ece: float | None, path: str | Path) -> Path:
    """Writes :func:`reliability_figure` as a PNG; returns ``path``."""
    return save_figure(reliability_figure(curve, ece), path)


@styled
def output_distribution_figure(task: str, labels: Sequence[str], y_true: np.ndarray, probs: np.ndarray,
                               threshold: float | None = None) -> Figure:
    """What the model outputs (study 2): the predicted probability of each class split by the true class, and the
    share of images predicted as each class next to the true share.

    Binary: one histogram of the positive-class probability; multiclass: one per class; multilabel: one per label
    (true positives against true negatives, unknown entries left out). Each histogram is normalised within its true
    class. The threshold (binary, multilabel; default 0.5) is drawn as a vertical line.
    """
    probs, y = np.asarray(probs, dtype=float), np.asarray(y_true, dtype=float)
    names = [str(label) for label in labels]
    threshold = None if task == "multiclass" else (0.5 if threshold is None else float(threshold))
    columns = [1] if task == "binary" else list(range(len(names)))
    fig = new_figure(len(columns) + 1, ncols=2 if len(columns) < 4 else 3, panel=(4.2, 3.1))
    bins = np.linspace(0, 1, 21)
    for ax, j in zip(fig.axes, columns):
        if task == "multilabel":
            groups = [("label absent", probs[y[:, j] == 0, j]), ("label present", probs[y[:, j] == 1, j])]
        else:
            groups = [(f"true {name}", probs[y == k, j]) for k, name in enumerate(names)]
        for k, (name, values) in enumerate(groups):  # each group normalised to sum to one, whatever its size
            ax.hist(values, bins=bins, weights=np.full(len(values), 1 / max(len(values), 1)), histtype="stepfilled",
                    alpha=0.45, color=f"C{k}", edgecolor=f"C{k}", label=name)
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.2f}")
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"predicted p({names[j]})")
        ax.set_ylabel("share of the true class")
        ax.set_title(f"p({names[j]}) by true " + ("label" if task == "multilabel" else "class"))
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=4, frameon=False)
    _share_bars(fig.axes[len(columns)], task, names, y, probs, threshold)
    return fig


def _share_bars(ax: Axes, task: str, names: list[str], y: np.ndarray, probs: np.ndarray,
                threshold: float | None) -> None:
    """Grouped bars: the true share of each class (prevalence of each label) and the predicted share."""
    if task == "multilabel":
        true_share = np.array([np.nanmean(y[:, j]) if (~np.isnan(y[:, j])).any() else 0 for j in range(len(names))])
        predicted_share = (probs >= threshold).mean(axis=0)
    else:
        predicted = (probs[:, 1] >= threshold).astype(int) if task == "binary" else probs.argmax(axis=1)
        true_share = np.bincount(y.astype(int), minlength=len(names)) / len(y)
        predicted_share = np.bincount(predicted, minlength=len(names)) / len(y)
    x = np.arange(len(names))
    ax.bar(x - 0.2, true_share, width=0.4, color="0.6", label="true")
    bars = ax.bar(x + 0.2, predicted_share, width=0.4, color="C0", label="predicted")
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    long = max(len(name) for name in names) > 8
    ax.set_xticks(x, names, rotation=40 if long else 0, ha="right" if long else "center")
    ax.set_ylim(0, max(1e-9, float(max(true_share.max(), predicted_share.max()))) * 1.35)  # room for the legend
    ax.set_ylabel("share of images")
    ax.set_title("Predicted share per " + ("label" if task == "multilabel" else "class"))
    ax.legend(loc="upper left", ncols=2)


def plot_output_distribution(labels: Sequence[str], y_true: np.ndarray, probs: np.ndarray, path: str | Path,
                             threshold: float | None = None, task: str | None = None) -> Path:
    """Writes :func:`output_distribution_figure` as a PNG; returns ``path``.

    The task is inferred when not given: 2-D targets are multilabel, two labels binary, more multiclass.
    """
    if task is None:
        task = "multilabel" if np.ndim(y_true) == 2 else "binary" if len(labels) == 2 else "multiclass"
    return save_figure(output_distribution_figure(task, labels, y_true, probs, threshold), path)


def write_eval_figures(out_dir: str | Path, task: str, labels: Sequence[str], y_true: np.ndarray, probs: np.ndarray,
                       metrics: Mapping[str, Any], reliability: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Writes ``roc.png``, ``pr.png``, ``confusion.png``, ``output_distribution.png`` and, when a reliability curve
    is given, ``reliability.png`` into ``out_dir``.

    Args:
        out_dir: the evaluation folder (``RUN/eval/<name>``).
        task: ``binary``, ``multiclass`` or ``multilabel``.
        labels: label names, in the column order of ``probs``.
        y_true: targets, as for :func:`cxrkit.eval.metrics.compute_metrics`.
        probs: predicted probabilities ``[n, labels]``.
        metrics: the :func:`~cxrkit.eval.metrics.compute_metrics` result (confusion matrices, threshold, ``ece``).
        reliability: a :func:`cxrkit.eval.calibration.reliability_curve` result.

    Returns:
        Figure name (``roc``, ``pr``, ``confusion``, ``output_distribution``, ``reliability``) -> path.
    """
    out = Path(out_dir)
    paths = {
        "roc": plot_roc(task, labels, y_true, probs, out / "roc.png"),
        "pr": plot_precision_recall(task, labels, y_true, probs, out / "pr.png"),
        "confusion": plot_confusion_matrix(labels, metrics["confusion_matrix"], out / "confusion.png",
                                           metrics.get("confusion_matrix_normalized")),
        "output_distribution": plot_output_distribution(labels, y_true, probs, out / "output_distribution.png",
                                                        metrics.get("threshold"), task=task),
    }
    if reliability is not None:
        ece = metrics.get("ece")
        paths["reliability"] = plot_reliability(reliability, ece if isinstance(ece, (int, float)) else None,
                                                out / "reliability.png")
    return paths
