"""One self-contained HTML report of a run: summary, recipe, data, metrics, figures and environment.

:func:`build_report` reads the run directory (``recipe.yaml``, ``labels.json``, ``data.json``, ``env.json``,
``metrics.csv`` and ``eval/<name>/{metrics.json, predictions.csv, *.png}``), draws the figures that are missing or
older than the files they show, and writes ``report.html`` next to the evaluation (or in the run when it has none).
Figures are embedded as base64 PNG data URIs and the CSS is inline, so the file has no external assets, needs no
JavaScript and reads offline. Every text taken from the run is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from cxrkit.errors import CxrError, first_line
from cxrkit.runs import Run, atomic_write_text, safe_name

SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"), ("recipe", "Recipe"), ("data", "Data"), ("metrics", "Metrics"), ("figures", "Figures"),
    ("environment", "Environment"),
)
EVAL_FIGURES: dict[str, str] = {
    "roc": "ROC curves", "pr": "Precision-recall curves", "confusion": "Confusion matrix",
    "output_distribution": "Output distribution", "reliability": "Reliability diagram",
}
KEY_METRICS = {"accuracy": "Accuracy", "auc": "AUC", "f1_macro": "F1 macro", "sensitivity": "Sensitivity",
               "specificity": "Specificity", "ece": "ECE"}
SCALAR_METRICS = (
    "n", "patients", "accuracy", "subset_accuracy", "auc", "average_precision", "f1_macro", "f1_weighted",
    "precision_macro", "recall_macro", "log_loss", "sensitivity", "specificity", "ppv", "npv", "ece", "threshold",
    "temperature",
)
_CONTEXT_KEYS = {"task", "positive", "run", "checkpoint", "dataset", "split", "external", "data"}
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2733;background:#f4f6f8;margin:0}
header{background:#1d3557;color:#fff;padding:18px 28px 10px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0 0 8px;color:#d7e1ec}nav a{color:#fff;margin-right:16px;text-decoration:none;font-weight:600}
main{max-width:1180px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:6px 22px 18px;margin:18px 0}
h2{border-bottom:2px solid #e3e8ee;padding-bottom:6px}h3{margin:18px 0 6px;font-size:15px}
table{border-collapse:collapse;margin:6px 0 12px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde3ea;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#eef2f6}tbody tr:nth-child(even) td{background:#fafbfc}td.num{text-align:right}
pre{background:#f6f8fa;border:1px solid #e3e8ee;border-radius:6px;padding:10px;overflow-x:auto;font-size:12px;
white-space:pre-wrap;word-break:break-word}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{border:1px solid #dde3ea;border-radius:8px;padding:8px 14px;min-width:130px;background:#fbfcfd}
.card .v{font-size:22px;font-weight:700}.card .k,.card .ci{color:#5a6978;font-size:12px}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:18px}
figure{margin:0;border:1px solid #e3e8ee;border-radius:6px;padding:8px;background:#fff}figure.wide{grid-column:1/-1}
figure img{display:block;max-width:100%;height:auto;margin:0 auto}
figcaption{color:#5a6978;font-size:12px;margin-top:4px}
.scroll{overflow-x:auto}table.kv th{background:#f3f6f9;font-weight:600}
.note{color:#5a6978}.warn{color:#a4161a;font-weight:600}
"""


def build_report(run_dir: str | Path, eval_name: str | None = None) -> Path:
    """Writes the HTML report of a run and returns its path.

    Args:
        run_dir: the run directory.
        eval_name: the evaluation folder under ``RUN/eval/`` to report; by default the most recently written one.
            Without any evaluation the report covers training only and goes to ``RUN/report.html``.

    Returns:
        ``RUN/eval/<name>/report.html``, or ``RUN/report.html`` when the run has no evaluation.

    Raises:
        CxrError: when ``run_dir`` is not a run, or has no evaluation called ``eval_name``.
    """
    run = Run.open(run_dir)
    eval_dir = find_eval(run, eval_name)
    out = eval_dir or run.path
    recipe_text = run.file("recipe.yaml").read_text()
    recipe = _load_yaml(recipe_text)
    labels = run.read_json("labels.json")  # written when training starts: a run without it is damaged
    metrics = _read_json(run, Path("eval") / eval_dir.name / "metrics.json") if eval_dir else {}
    figures = _figures(run, out, eval_dir, labels, metrics)
    sections = {
        "summary": _summary(run, recipe, labels, metrics, eval_dir),
        "recipe": _recipe(recipe, recipe_text),
        "data": _data(recipe, run.read_json("data.json")),
        "metrics": _metrics(metrics, run.read_metrics()),
        "figures": _figure_grid(figures),
        "environment": _environment(_read_json(run, "env.json")),
    }
    subtitle = f"evaluation {eval_dir.name}" if eval_dir else "training only (no evaluation yet)"
    path = out / "report.html"
    atomic_write_text(path, _page(run.name, subtitle, sections))
    return path


def find_eval(run: Run, name: str | None = None) -> Path | None:
    """The evaluation folder ``RUN/eval/<name>`` (default: the one whose ``metrics.json`` is newest), or None."""
    found = sorted(run.path.glob("eval/*/metrics.json"), key=lambda p: p.stat().st_mtime)
    if name is None:
        return found[-1].parent if found else None
    name = safe_name(name, "eval")  # as cxr evaluate --name made it
    if not (run.path / "eval" / name / "metrics.json").is_file():
        if (run.path / "eval" / name).is_dir():  # metrics.json is written last
            raise CxrError(f"run {run.path}: evaluation {name!r} did not finish (it has no metrics.json); run "
                           f"`cxr evaluate {run.path} --name {name}` (with its other options) again")
        have = ", ".join(p.parent.name for p in found) or "none"
        raise CxrError(f"run {run.path} has no evaluation {name!r} (it has: {have}); run `cxr evaluate` first")
    return run.path / "eval" / name


def _read_json(run: Run, name: str | Path) -> dict[str, Any]:
    """A JSON file of the run, or ``{}`` when it is absent (reports are drawn from partial runs too)."""
    return run.read_json(str(name)) if (run.path / name).is_file() else {}


def _load_yaml(text: str) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise CxrError(f"recipe.yaml cannot be read: {first_line(err)}") from None
    return loaded if isinstance(loaded, dict) else {}


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    """Whether ``path`` is a file that starts as a PNG does (a damaged figure is drawn again, not embedded)."""
    try:
        with path.open("rb") as fh:
            return fh.read(len(_PNG_SIGNATURE)) == _PNG_SIGNATURE
    except OSError:
        return False


def _stale(path: Path, *sources: Path) -> bool:
    """True when ``path`` is missing, not a PNG, or older than any existing source."""
    if not _is_png(path):
        return True
    mtime = path.stat().st_mtime
    return any(s.is_file() and s.stat().st_mtime > mtime for s in sources)


def _figures(run: Run, out: Path, eval_dir: Path | None, labels: dict, metrics: dict) -> list[tuple[str, Path]]:
    """The figures of the report as ``(caption, png)``, drawing the missing and outdated ones."""
    from cxrkit.eval.curves import plot_training_curves

    figures = []
    curves = out / "training_curves.png"
    rows = run.read_metrics()
    if rows and _stale(curves, run.file("metrics.csv")):
        plot_training_curves({run.name: rows}, curves, title=f"Training curves: {run.name}")
    if rows and _is_png(curves):  # without metrics.csv an earlier figure would show a history the report lacks
        figures.append(("Training curves (red dashed lines: stage boundaries)", curves))
    if eval_dir is None:
        return figures
    sources = (eval_dir / "metrics.json", eval_dir / "predictions.csv")
    if any(_stale(eval_dir / f"{key}.png", *sources) for key in ("roc", "pr", "confusion", "output_distribution")):
        _draw_eval_figures(eval_dir, labels, metrics)
    for key, caption in EVAL_FIGURES.items():
        if _is_png(eval_dir / f"{key}.png"):
            figures.append((caption, eval_dir / f"{key}.png"))
    known = {f"{key}.png" for key in EVAL_FIGURES} | {curves.name}
    figures += [(p.stem.replace("_", " "), p) for p in sorted(eval_dir.glob("*.png"))
                if p.name not in known and _is_png(p)]
    return figures


def _draw_eval_figures(eval_dir: Path, labels: dict, metrics: dict) -> None:
    """Draws the evaluation figures from ``predictions.csv`` (only the confusion matrix without it)."""
    from cxrkit.eval import plots

    task, names = metrics.get("task") or labels.get("task"), metrics.get("labels") or labels.get("labels") or []
    predictions = read_predictions(eval_dir / "predictions.csv", task, names)
    if predictions is None:
        if metrics.get("confusion_matrix") is not None:
            plots.plot_confusion_matrix(names, metrics["confusion_matrix"], eval_dir / "confusion.png",
                                        metrics.get("confusion_matrix_normalized"))
        return
    y_true, probs = predictions
    reliability = metrics.get("reliability") or _reliability(task, y_true, probs)
    plots.write_eval_figures(eval_dir, task, names, y_true, probs, metrics, reliability)


def _reliability(task: str, y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any] | None:
    """The reliability curve when ``metrics.json`` has none (evaluations written before calibration existed)."""
    try:
        from cxrkit.eval.calibration import reliability_curve
    except ImportError:  # the calibration module (or scipy) is optional for a report
        return None
    return reliability_curve(task, y_true, probs)


def read_predictions(path: Path, task: str, labels: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Targets and probabilities from ``predictions.csv`` in :func:`~cxrkit.eval.metrics.compute_metrics` form.

    Rows whose true label is not one of ``labels`` are left out. Multilabel targets are read from the ``|``-joined
    ``true`` column, so labels unknown at evaluation count as absent here. Returns None when there is no file or row.
    """
    if not path.is_file() or not labels:
        return None
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if task != "multilabel":
        rows = [row for row in rows if row.get("true") in labels]
    if not rows:
        return None
    probs = np.array([[float(row[f"p_{name}"]) for name in labels] for row in rows])
    if task == "multilabel":
        present = [set(filter(None, (row.get("true") or "").split("|"))) for row in rows]
        return np.array([[float(name in p) for name in labels] for p in present]), probs
    return np.array([labels.index(row["true"]) for row in rows]), probs


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]  # the IHDR chunk holds width and height right after the signature
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def _figure_grid(figures: list[tuple[str, Path]]) -> str:
    """Figures two to a row; wide ones, and a narrow one left without a partner, take a row of their own."""
    if not figures:
        return '<p class="note">No figures: the run has no training log and no evaluation yet.</p>'
    sizes = [_png_size(path) for _, path in figures]
    full_row = [width > 1.6 * height or width > 800 for width, height in sizes]  # too small at half width
    narrow_run = 0
    for i, wide in enumerate([*full_row, True]):
        if wide and narrow_run % 2:
            full_row[i - 1] = True
        narrow_run = 0 if wide else narrow_run + 1
    parts = [
        f'<figure class="{"wide" if wide else "half"}"><img src="{_data_uri(path)}" alt="{_e(caption)}" '
        f'width="{width}" height="{height}"><figcaption>{_e(caption)} ({_e(path.name)})</figcaption></figure>'
        for (caption, path), (width, height), wide in zip(figures, sizes, full_row)
    ]
    return '<div class="figs">' + "".join(parts) + "</div>"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: str = ".4f") -> str:
    """A value as text: metrics with 4 decimals (``digits=".4g"`` for settings), None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, digits)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _table(header: list[str], rows: list[list[Any]], numeric_from: int = 1, digits: str = ".4f") -> str:
    """An escaped HTML table; cells from column ``numeric_from`` on are right-aligned."""
    head = "".join(f"<th>{_e(h.replace('_', ' '))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if j >= numeric_from else ""}>{_e(_fmt(v, digits))}</td>'
                         for j, v in enumerate(row)) + "</tr>"
        for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _kv_table(rows: list[list[Any]]) -> str:
    """A two-column key / value table of settings (no header row)."""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v, '.4g'))}</td></tr>" for k, v in rows)
    return f'<div class="scroll"><table class="kv"><tbody>{body}</tbody></table></div>'


def _ci(metrics: dict, key: str) -> str:
    ci = (metrics.get("ci95") or {}).get(key) if isinstance(metrics.get("ci95"), dict) else None
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        return f"{ci[0]:.3f} – {ci[1]:.3f}"
    return ""


def _summary(run: Run, recipe: dict, labels: dict, metrics: dict, eval_dir: Path | None) -> str:
    model = recipe.get("model") or {}
    facts = [
        ["run", run.name], ["description", recipe.get("description") or ""],
        ["backbone", model.get("backbone")], ["weights", model.get("weights")],
        ["task", labels.get("task")], ["labels", ", ".join(map(str, labels.get("labels") or []))],
    ]
    # an evaluation's own calibration: an int8 model has its own temperature and threshold, and an earlier
    # evaluation may predate a new `cxr calibrate`
    used = {**labels, **{k: metrics[k] for k in ("threshold", "threshold_method", "temperature") if k in metrics}}
    facts += [[key, used[key]] for key in ("positive", "threshold", "threshold_method", "temperature")
              if used.get(key) is not None]
    if not eval_dir:
        return _kv_table(facts) + '<p class="note">No evaluation yet: run <code>cxr evaluate RUN</code>.</p>'
    external = " (external validation)" if metrics.get("external") else ""
    facts.append(["evaluated on", f"{metrics.get('dataset')} {metrics.get('split')}{external}: "
                                  f"{metrics.get('n')} images, {metrics.get('patients')} patients"])
    facts.append(["evaluated with", f"engine {metrics.get('engine', 'torch')}, checkpoint "
                                    f"{metrics.get('checkpoint', 'best')}"])
    cards = []
    for key, name in KEY_METRICS.items():
        if isinstance(metrics.get(key), (int, float)):
            ci = _ci(metrics, key)
            ci_html = f'<div class="ci">95% CI {_e(ci)}</div>' if ci else ""
            cards.append(f'<div class="card"><div class="k">{_e(name)}</div><div class="v">{metrics[key]:.3f}</div>'
                         f"{ci_html}</div>")
    return f'<div class="cards">{"".join(cards)}</div>' + _kv_table(facts)


def _recipe(recipe: dict, text: str) -> str:
    columns = ("name", "trainable", "epochs", "optimizer", "lr", "weight_decay", "schedule", "batchnorm")
    stages = [[i + 1, *(stage.get(c) for c in columns), (stage.get("early_stopping") or {}).get("patience")]
              for i, stage in enumerate(recipe.get("stages") or [])]
    model = recipe.get("model") or {}
    loss = recipe.get("loss") or {}
    return (
        "<h3>Stages</h3>" + _table(["#", *columns, "early stopping patience"], stages, 3, ".4g")
        + "<h3>Model and loss</h3>" + _kv_table([[k, v] for k, v in {**model, **loss}.items()])
        + f"<h3>recipe.yaml</h3><pre>{_e(text)}</pre>"
    )


def _data(recipe: dict, data: dict) -> str:
    splits = data.get("splits") or {}
    names = list(dict.fromkeys(n for s in splits.values() for n in (s.get("per_label") or {})))
    rows = [[split, s.get("images"), s.get("patients"), *((s.get("per_label") or {}).get(n, 0) for n in names)]
            for split, s in splits.items()]
    grouped = ((recipe.get("data") or {}).get("split") or {}).get("group_by_patient")
    anonymous = data.get("without_patient_id") or 0
    if not grouped:
        note = '<p class="warn">Split NOT grouped by patient: a patient may appear in several splits.</p>'
    elif anonymous:
        note = (f'<p class="warn">Split grouped by patient, but {anonymous} images have no patient id: each counts '
                "as its own patient, so images of one patient may be in several splits.</p>")
    else:
        note = '<p class="note">Split grouped by patient: all images of a patient are in the same split.</p>'
    skipped = data.get("skipped") or []
    skipped_html = f"<p>Skipped files: {len(skipped)}</p>"
    if skipped:
        items = "".join(f"<li>{_e(s.get('source'))}: {_e(s.get('reason'))}</li>" for s in skipped[:200])
        skipped_html += f"<details><summary>list</summary><ul>{items}</ul></details>"
    dataset = data.get("dataset") or {}
    prep = data.get("preprocessing") or {}
    return (
        f"<p>Dataset <b>{_e(dataset.get('name', ''))}</b> ({_e(dataset.get('task', ''))})</p>"
        + _table(["split", "images", "patients", *names], rows) + note + skipped_html
        + "<h3>Preprocessing</h3>" + _kv_table([[k, v] for k, v in prep.items()])
    )


def _metrics(metrics: dict, history: list[dict[str, str]]) -> str:
    parts = []
    if not metrics:
        parts.append('<p class="note">No evaluation yet: run <code>cxr evaluate RUN</code>.</p>')
    else:
        parts.append(_scalar_table(metrics))
        parts.append("<h3>Per class</h3>" + _per_class_table(metrics))
        parts.append("<h3>Confusion matrix</h3>" + _confusion_table(metrics))
    if history:
        columns = [c for c in history[0] if c not in ("stage", "stage_epoch")]
        scores = ("loss", "accuracy", "auc")  # 4 decimals; times, rates and learning rates 4 significant digits
        rows = [[_fmt(_number(row.get(c)), ".4f" if any(w in c for w in scores) else ".4g") for c in columns]
                for row in history]
        parts.append("<h3>Training history (metrics.csv)</h3>" + _table(columns, rows, 2))
    return "".join(parts)


def _scalar_table(metrics: dict) -> str:
    """Every number of ``metrics.json`` with its 95% CI when there is one, and how the intervals were made."""
    keys = [k for k in SCALAR_METRICS if k in metrics]
    keys += [k for k, v in metrics.items() if k not in keys and k not in _CONTEXT_KEYS
             and isinstance(v, (int, float)) and not isinstance(v, bool)]
    rows = [[k, metrics[k], _ci(metrics, k)] for k in keys]
    if not any(row[2] for row in rows):
        return _table(["metric", "value"], [row[:2] for row in rows])
    method = (metrics.get("ci95") or {}).get("method")
    note = ""
    if isinstance(method, dict):
        note = (f'<p class="note">95% CI: {_e(method.get("interval", ""))} bootstrap, {_e(method.get("n_boot", "?"))} '
                f'resamples of {_e(method.get("resampled", "images"))} ({_e(method.get("n_units", "?"))} each).</p>')
    return _table(["metric", "value", "95% CI"], rows) + note


def _number(value: str | None) -> Any:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return value
    return int(number) if number.is_integer() and "." not in str(value) else number


def _per_class_table(metrics: dict) -> str:
    per_class = metrics.get("per_class") or {}
    auc, ap = metrics.get("auc_per_label") or {}, metrics.get("average_precision_per_label") or {}
    extra = ["n_known"] if any("n_known" in row for row in per_class.values()) else []
    rows = [[name, row.get("precision"), row.get("recall"), row.get("f1"), row.get("support"),
             *(row.get(k) for k in extra), auc.get(name, ""), ap.get(name, "")] for name, row in per_class.items()]
    return _table(["label", "precision", "recall", "F1", "support", *extra, "AUC", "AP"], rows)


def _confusion_table(metrics: dict) -> str:
    cm, norm = metrics.get("confusion_matrix"), metrics.get("confusion_matrix_normalized")
    if isinstance(cm, dict):
        rows = [[name, *np.asarray(m).ravel().tolist()] for name, m in cm.items()]
        return _table(["label", "TN", "FP", "FN", "TP"], rows)
    if not cm:
        return '<p class="note">none</p>'
    names = metrics.get("labels") or []
    norm = norm or [[None] * len(row) for row in cm]
    rows = [[name, *(f"{c} ({_fmt(s)})" for c, s in zip(crow, srow))] for name, crow, srow in zip(names, cm, norm)]
    return _table(["true \\ predicted", *names], rows) + '<p class="note">Counts (share of the true class).</p>'


def _environment(env: dict) -> str:
    if not env:
        return '<p class="note">No env.json in this run.</p>'
    rows = [[k, shlex.join(map(str, v)) if k == "argv" and isinstance(v, list) else v] for k, v in env.items()]
    return _kv_table(rows)


def _page(run_name: str, subtitle: str, sections: dict[str, str]) -> str:
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS)
    body = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{sections[sid]}</section>' for sid, title in SECTIONS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>cxrkit report: {_e(run_name)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>cxrkit report: {_e(run_name)}</h1><p>{_e(subtitle)}</p><nav>{nav}</nav></header>"
        f"<main>{body}</main></body></html>\n"
    )
