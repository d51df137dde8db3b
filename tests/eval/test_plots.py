"""Figures: each writes a plausible PNG, draws what it should, and leaves no pyplot state behind."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from cxrkit.eval import plots
from cxrkit.eval.curves import plot_training_curves, stage_spans, training_curves_figure
from cxrkit.eval.metrics import compute_metrics

BINARY = ["NORMAL", "PNEUMONIA"]
MULTICLASS = ["NORMAL", "BACTERIA", "VIRUS"]
MULTILABEL = ["Effusion", "Mass", "Nodule"]


def _two_stage_rows(n_first: int = 3, n_second: int = 2, as_text: bool = True) -> list[dict]:
    rows = []
    for epoch in range(1, n_first + n_second + 1):
        stage = 1 if epoch <= n_first else 2
        row = {"epoch": epoch, "stage": stage, "stage_name": "head" if stage == 1 else "finetune",
               "train_loss": 1 / epoch, "val_loss": 1.2 / epoch, "train_accuracy": 0.5 + epoch / 20,
               "val_accuracy": 0.5 + epoch / 25, "val_auc": ""}
        rows.append({k: str(v) for k, v in row.items()} if as_text else row)
    return rows


def _task_data(task: str, n: int = 120) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    if task == "multilabel":
        y = (rng.random((n, 3)) < 0.4).astype(float)
        y[rng.random((n, 3)) < 0.1] = np.nan  # unknown entries are left out
        return MULTILABEL, y, 1 / (1 + np.exp(-(2 * np.nan_to_num(y) - 1 + rng.normal(size=(n, 3)))))
    labels = BINARY if task == "binary" else MULTICLASS
    y = rng.integers(0, len(labels), n)
    logits = rng.normal(size=(n, len(labels)))
    logits[np.arange(n), y] += 1.5
    return labels, y, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def _assert_png(path, min_side: int = 300) -> None:
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min_side <= min(image.size) and max(image.size) <= 3000, image.size
        assert len(image.convert("L").getcolors(maxcolors=1 << 16) or range(300)) > 20  # drawn, not blank


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before == []


def _stage_lines(ax) -> list:
    return [line for line in ax.lines if line.get_gid() == "stage-boundary"]


def test_training_curves_one_run_marks_each_stage_boundary(tmp_path):
    rows = _two_stage_rows()
    fig = training_curves_figure({"run": rows})
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]
    for ax in fig.axes:
        boundaries = _stage_lines(ax)
        assert len(boundaries) == 1
        assert to_rgba(boundaries[0].get_color()) == to_rgba("red") and boundaries[0].get_linestyle() == "--"
        assert boundaries[0].get_xdata()[0] == 3.5  # between the last head epoch and the first fine-tuning one
        assert {"head", "finetune"} <= {text.get_text() for text in ax.texts}
        assert [line.get_label() for line in ax.lines if line.get_gid() is None] == ["train", "val"]
    path = plot_training_curves({"run": rows}, tmp_path / "curves.png", title="run")
    assert path == tmp_path / "curves.png"
    _assert_png(path)


def test_training_curves_three_stages_and_numbers(tmp_path):
    rows = _two_stage_rows(2, 2, as_text=False)
    rows += [dict(row, epoch=row["epoch"] + 4, stage=3, stage_name="all") for row in rows[:2]]
    assert stage_spans(rows) == [("head", 1, 2), ("finetune", 3, 4), ("all", 5, 6)]
    fig = training_curves_figure({"run": rows}, metrics=("loss",))
    assert len(_stage_lines(fig.axes[0])) == 2


def test_training_curves_several_runs_overlay_solid_train_dashed_val(tmp_path):
    runs = {"imagenet": _two_stage_rows(), "scratch": _two_stage_rows(2, 3)}
    fig = training_curves_figure(runs, metrics=("loss",))
    (ax,) = fig.axes
    curves = [line for line in ax.lines if line.get_gid() is None]
    assert [c.get_label() for c in curves] == ["imagenet train", "imagenet val", "scratch train", "scratch val"]
    assert [c.get_linestyle() for c in curves] == ["-", "--", "-", "--"]
    assert curves[0].get_color() == curves[1].get_color() != curves[2].get_color()
    assert _stage_lines(ax) == []  # the runs change stage at different epochs
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["imagenet", "scratch", "train", "val"]
    _assert_png(plot_training_curves(runs, tmp_path / "compare.png", metrics=("loss",)))


def test_training_curves_missing_metric_is_a_note():
    fig = training_curves_figure({"run": _two_stage_rows()}, metrics=("auc",))
    assert "no auc recorded" in [t.get_text() for t in fig.axes[0].texts]


@pytest.mark.parametrize(("task", "curves"), [("binary", 1), ("multiclass", 4), ("multilabel", 3)])
def test_roc_one_curve_per_class_plus_macro_and_chance(task, curves, tmp_path):
    labels, y, p = _task_data(task)
    ax = plots.roc_figure(task, labels, y, p).axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(ax.lines) == curves + 1 and legend[-1] == "chance"
    assert all("AUC 0." in text for text in legend[:-1])
    if task == "multiclass":
        auc = compute_metrics(task, labels, y, p)["auc"]
        assert legend[-2] == f"macro (AUC {auc:.3f})"  # the same macro AUC as metrics.json
    _assert_png(plots.plot_roc(task, labels, y, p, tmp_path / "roc.png"))


def test_roc_lists_a_class_that_is_absent_without_a_curve():
    labels, y, p = _task_data("multiclass")
    keep = y != 2
    ax = plots.roc_figure("multiclass", labels, y[keep], p[keep]).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()][2] == "VIRUS (no positives, AUC n/a)"
    assert len([line for line in ax.lines if len(line.get_xdata())]) == 2 + 2  # two classes, macro, chance


NIH14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
         "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def _nih14_without_hernia(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Fourteen labels, as in NIH ChestX-ray14; the split has no Hernia positive (the last label)."""
    rng = np.random.default_rng(1)
    y = (rng.random((n, len(NIH14))) < 0.2).astype(float)
    y[:, -1] = 0
    y[rng.random(y.shape) < 0.05] = np.nan
    return y, 1 / (1 + np.exp(-(2 * np.nan_to_num(y) - 1 + rng.normal(size=y.shape))))


def _curves(ax) -> list:
    return [line for line in ax.lines if len(line.get_xdata()) and line.get_label() != "chance"]


@pytest.mark.parametrize(("build", "score"), [(plots.roc_figure, "AUC"), (plots.precision_recall_figure, "AP")])
def test_fourteen_labels_all_listed_in_distinct_colours_beside_the_axes(build, score):
    y, p = _nih14_without_hernia()
    fig = build("multilabel", NIH14, y, p)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [text.split(" (")[0] for text in legend if text != "chance"] == NIH14  # every label, in order
    assert legend[NIH14.index("Hernia")] == f"Hernia (no positives, {score} n/a)"
    curves = _curves(ax)
    assert [c.get_label().split(" (")[0] for c in curves] == NIH14[:-1]
    assert len({to_rgba(c.get_color()) for c in curves}) == len(curves)  # the default cycle repeats after ten
    fig.canvas.draw()
    box, legend_box = ax.get_window_extent(), ax.get_legend().get_window_extent()
    assert legend_box.x0 >= box.x1 and legend_box.x1 <= fig.bbox.x1  # beside the curves, inside the figure


def test_roc_and_pr_give_a_label_the_same_colour():
    y, p = _nih14_without_hernia()
    roc, pr = (build("multilabel", NIH14, y, p).axes[0] for build in (plots.roc_figure, plots.precision_recall_figure))
    assert [to_rgba(c.get_color()) for c in _curves(roc)] == [to_rgba(c.get_color()) for c in _curves(pr)]


def test_curve_styles_stay_distinct_past_twenty():
    styles = plots.curve_styles(30)
    assert len({(to_rgba(s["color"]), s["linestyle"]) for s in styles}) == 30
    assert [s["color"] for s in plots.curve_styles(3)] == ["C0", "C1", "C2"]  # few curves: the default cycle


@pytest.mark.parametrize(("task", "curves"), [("binary", 1), ("multiclass", 3), ("multilabel", 3)])
def test_precision_recall_has_ap_in_the_legend(task, curves, tmp_path):
    labels, y, p = _task_data(task)
    ax = plots.precision_recall_figure(task, labels, y, p).axes[0]
    ap = [t.get_text() for t in ax.get_legend().get_texts() if "(AP " in t.get_text()]
    assert len(ap) == curves
    _assert_png(plots.plot_precision_recall(task, labels, y, p, tmp_path / "pr.png"))


def test_confusion_matrix_counts_and_normalized_side_by_side(tmp_path):
    labels, y, p = _task_data("multiclass")
    metrics = compute_metrics("multiclass", labels, y, p)
    fig = plots.confusion_matrix_figure(labels, metrics["confusion_matrix"])
    counts, shares = fig.axes
    assert len(counts.texts) == len(shares.texts) == 9
    assert {t.get_text() for t in counts.texts} == {str(v) for row in metrics["confusion_matrix"] for v in row}
    assert shares.images[0].get_array().max() <= 1.0
    _assert_png(plots.plot_confusion_matrix(labels, metrics["confusion_matrix"], tmp_path / "cm.png",
                                            metrics["confusion_matrix_normalized"]))


def test_confusion_matrix_multilabel_is_a_grid_of_two_by_two(tmp_path):
    labels, y, p = _task_data("multilabel")
    matrices = compute_metrics("multilabel", labels, y, p)["confusion_matrix"]
    fig = plots.confusion_matrix_figure(labels, matrices)
    assert [ax.get_title() for ax in fig.axes] == labels
    assert all(len(ax.texts) == 4 for ax in fig.axes)
    _assert_png(plots.plot_confusion_matrix(labels, matrices, tmp_path / "cm.png"))


def test_reliability_draws_filled_bins_and_ece(tmp_path):
    curve = {"kind": "top-label", "edges": [0.0, 0.25, 0.5, 0.75, 1.0], "confidence": [None, 0.4, 0.6, 0.9],
             "accuracy": [None, 0.3, 0.65, 0.8], "count": [0, 5, 20, 75]}
    fig = plots.reliability_figure(curve, 0.0512)
    top, bottom = fig.axes
    assert len(top.patches) == 3 and len(bottom.patches) == 4  # empty bins have no accuracy bar
    assert "ECE = 0.051" in top.get_title()
    _assert_png(plots.plot_reliability(curve, None, tmp_path / "reliability.png"))


def test_reliability_accepts_the_calibration_module_curve():
    calibration = pytest.importorskip("cxrkit.eval.calibration")
    labels, y, p = _task_data("binary")
    fig = plots.reliability_figure(calibration.reliability_curve("binary", y, p), 0.1)
    assert fig.axes[0].patches


@pytest.mark.parametrize(("task", "panels"), [("binary", 2), ("multiclass", 4), ("multilabel", 4)])
def test_output_distribution_histograms_per_class_and_share_bars(task, panels, tmp_path):
    labels, y, p = _task_data(task)
    fig = plots.output_distribution_figure(task, labels, y, p, threshold=0.4)
    assert len(fig.axes) == panels
    bars = fig.axes[-1]
    assert len(bars.patches) == 2 * len(labels)  # true and predicted share of each class
    groups = 2 if task != "multiclass" else 3
    assert all(len(ax.patches) == groups for ax in fig.axes[:-1])  # one histogram per true class
    thresholds = [line for ax in fig.axes[:-1] for line in ax.lines if line.get_label() == "threshold 0.40"]
    assert len(thresholds) == (0 if task == "multiclass" else panels - 1)
    _assert_png(plots.plot_output_distribution(labels, y, p, tmp_path / "out.png", threshold=0.4))


@pytest.mark.parametrize(("task", "with_reliability"), [("multilabel", True), ("multiclass", False)])
def test_write_eval_figures_writes_every_file(task, with_reliability, tmp_path):
    labels, y, p = _task_data(task, n=60)
    threshold = None if task == "multiclass" else 0.5
    metrics = {**compute_metrics(task, labels, y, p, threshold), "ece": 0.05}
    curve = {"kind": "positive", "edges": [0, 0.5, 1], "confidence": [0.2, 0.8], "accuracy": [0.3, 0.7],
             "count": [30, 30]}
    written = plots.write_eval_figures(tmp_path, task, labels, y, p, metrics, curve if with_reliability else None)
    names = {"roc", "pr", "confusion", "output_distribution"} | ({"reliability"} if with_reliability else set())
    assert set(written) == names
    assert {path.name for path in tmp_path.iterdir()} == {f"{name}.png" for name in names}
    for path in written.values():
        _assert_png(path)


def test_characters_no_installed_font_has_give_one_note_instead_of_a_warning_each(tmp_path, capsys):
    """Class names in a script DejaVu Sans lacks gave dozens of matplotlib warnings, each with its source line."""
    import warnings

    labels = ["\U0001d801 normal", "\U0001d802 other"]  # Sutton SignWriting: in no font a machine is likely to have
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that reaches the caller fails the test
        for name in ("a.png", "b.png"):
            plots.plot_confusion_matrix(labels, np.array([[3, 1], [2, 4]]), tmp_path / name)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: no installed font")]
    assert notes == ["note: no installed font draws \U0001d801\U0001d802, so figures show boxes in their place; "
                     "install a font that has them (such as Noto Sans CJK)"]
    assert plots.font_families()[0] == "DejaVu Sans"


def test_a_warning_that_is_not_about_fonts_still_reaches_the_caller(tmp_path):
    from matplotlib.artist import Artist
    from matplotlib.figure import Figure

    class Warns(Artist):
        def draw(self, renderer):
            import warnings

            warnings.warn("drawn with a caveat", UserWarning, stacklevel=1)

    fig = Figure()
    fig.add_artist(Warns())
    with pytest.warns(UserWarning, match="drawn with a caveat"):
        plots.save_figure(fig, tmp_path / "x.png")
