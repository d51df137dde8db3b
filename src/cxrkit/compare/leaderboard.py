"""The leaderboard of a comparison, rebuilt from the cells' files: one row per cell, like the studies' tables.

Columns: cell, status, backbone, weights, the other axes that vary, first-epoch train loss and val accuracy, the
epoch of the evaluated checkpoint (``best.pt`` unless the spec evaluates ``last``) with its val accuracy and val AUC
(from ``metrics.csv``), accuracy / F1 (macro) / AUC on the evaluated split (with their 95% intervals when
``metrics.json`` has ``ci95``), training time (train + validation seconds of every epoch) and trainable / total
parameters of the last stage. Written as ``leaderboard.csv`` (raw numbers), ``leaderboard.md`` and
``leaderboard.html``, with the training curves of every cell in ``curves.png``.

The val numbers are those of the checkpoint's epoch, not the best of each column over the epochs: ``best.pt`` is the
epoch with the best ``runtime.checkpoint_monitor`` (``val_auc`` in the multi-label recipes), and on a multi-label
split the highest element-wise accuracy, which the negatives dominate, can belong to another epoch entirely.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrkit.compare.render import Column, columns_for, html_report, markdown_report, seed_summary
from cxrkit.runs import Run, atomic_write_text, csv_text

if TYPE_CHECKING:
    from rich.console import Console

    from cxrkit.compare.runner import Plan
    from cxrkit.compare.spec import Cell

ALWAYS = ("backbone", "weights")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def confidence_interval(metrics: dict[str, Any], key: str) -> tuple[float, float] | None:
    """``(low, high)`` of ``metrics["ci95"][key]`` given as ``[low, high]`` or ``{low, high}`` (or lower/upper)."""
    ci = (metrics.get("ci95") or {}).get(key) if isinstance(metrics.get("ci95"), dict) else None
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        low, high = ci
    elif isinstance(ci, dict):
        low = next((ci[k] for k in ("low", "lower", "lo") if k in ci), None)
        high = next((ci[k] for k in ("high", "upper", "hi") if k in ci), None)
    else:
        return None
    low, high = _number(low), _number(high)
    return None if low is None or high is None else (low, high)


def checkpoint_epoch(run: Run, checkpoint: str) -> int | None:
    """The epoch whose weights the run's ``checkpoint`` (``best`` or ``last``) holds, as the checkpoint records it;
    None when the run has no such checkpoint."""
    if not run.has_checkpoint(checkpoint):
        return None
    epoch = run.load_checkpoint(checkpoint, lazy=True).get("epoch")  # not its weights and optimizer state (GBs)
    return None if epoch is None else int(epoch)


def training_scores(rows: list[dict[str, str]], epoch: int | None = None) -> dict[str, Any]:
    """Scores, epochs and seconds from ``metrics.csv`` rows.

    Args:
        rows: the run's ``metrics.csv`` rows.
        epoch: the epoch of the evaluated checkpoint (:func:`checkpoint_epoch`); its row gives
            ``checkpoint_val_accuracy`` and ``checkpoint_val_auc`` (None when no row has that epoch).

    Returns:
        ``epochs``, ``first_epoch_train_loss``, ``first_epoch_val_accuracy``, ``checkpoint_epoch``,
        ``checkpoint_val_accuracy``, ``checkpoint_val_auc`` and ``training_seconds``.
    """
    if not rows:
        return {}
    chosen = next((r for r in rows if epoch is not None and _number(r.get("epoch")) == epoch), {})
    seconds = sum((_number(r.get("train_seconds")) or 0.0) + (_number(r.get("val_seconds")) or 0.0) for r in rows)
    return {
        "epochs": len(rows),
        "first_epoch_train_loss": _number(rows[0].get("train_loss")),
        "first_epoch_val_accuracy": _number(rows[0].get("val_accuracy")),
        "checkpoint_epoch": epoch if chosen else None,
        "checkpoint_val_accuracy": _number(chosen.get("val_accuracy")),
        "checkpoint_val_auc": _number(chosen.get("val_auc")),
        "training_seconds": round(seconds, 1),
    }


def evaluation_scores(metrics: dict[str, Any], split: str) -> dict[str, Any]:
    """Accuracy, macro F1 and AUC of one evaluation (and their 95% intervals when present)."""
    out: dict[str, Any] = {}
    for key in ("accuracy", "f1_macro", "auc"):
        out[f"{split}_{key}"] = _number(metrics.get(key))
        ci = confidence_interval(metrics, key)
        if ci is not None:
            out[f"{split}_{key}_ci95_low"], out[f"{split}_{key}_ci95_high"] = ci
    if "n" in metrics:
        out[f"{split}_images"] = metrics["n"]
    return out


def format_duration(seconds: float | None) -> str:
    """``3h 02m``, ``12m 05s`` or ``42s``."""
    if seconds is None:
        return "-"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _parameters(run: Run, info: dict[str, Any]) -> dict[str, Any] | None:
    """Parameter counts from ``cell.json``, else counted on the run's model (a cell finished before they were kept)."""
    from cxrkit.compare.runner import count_parameters

    if info.get("params") is None and run.file("labels.json").is_file():
        return count_parameters(run)
    return info.get("params")


def cell_row(plan: Plan, cell: Cell, varying: list[str]) -> dict[str, Any]:
    """The leaderboard row of one cell, from its run directory."""
    from cxrkit.compare.runner import cell_status, read_cell_info

    run = Run(plan.cell_dir(cell))
    info = read_cell_info(run.path)
    split = plan.spec.evaluate.split
    row: dict[str, Any] = {"cell": cell.id, "status": cell_status(plan, cell),
                           "backbone": cell.recipe.model.backbone, "weights": cell.recipe.model.weights}
    row.update({axis: cell.labels[axis] for axis in varying})
    status = row["status"]
    epoch = checkpoint_epoch(run, plan.spec.evaluate.checkpoint) if status == "done" else None
    row.update(training_scores(run.read_metrics(), epoch))
    metrics_path = run.path / "eval" / plan.eval_name / "metrics.json"
    if metrics_path.is_file():
        row.update(evaluation_scores(json.loads(metrics_path.read_text()), split))
    row["training_time"] = format_duration(row.get("training_seconds"))
    params = _parameters(run, info) if status == "done" else info.get("params")
    row["trainable_params"] = params.get("trainable") if params else None
    row["total_params"] = params.get("total") if params else None
    row["error"] = info.get("error") if status == "failed" else None
    return row


def varying_axes(plan: Plan) -> list[str]:
    """Axes with more than one value, other than backbone and weights (always shown)."""
    return [axis.name for axis in plan.spec.matrix if len(axis.values) > 1 and axis.name not in ALWAYS]


def sort_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Finished cells by ``key`` descending; then cells without that score, in spec order."""
    scored = [r for r in rows if r["status"] == "done" and r.get(key) is not None]
    rest = [r for r in rows if r not in scored]
    return sorted(scored, key=lambda r: -r[key]) + rest


def leaderboard_rows(plan: Plan) -> list[dict[str, Any]]:
    """Every cell's row, sorted by the spec's ``sort`` key (on the evaluated split)."""
    varying = varying_axes(plan)
    rows = [cell_row(plan, cell, varying) for cell in plan.cells]
    split = plan.spec.evaluate.split
    key = plan.spec.sort.replace("test_", f"{split}_", 1) if plan.spec.sort.startswith("test_") else plan.spec.sort
    return sort_rows(rows, key)


def split_fingerprints(plan: Plan) -> dict[str, str]:
    """SHA-256 (first 12 hex digits) of each trained cell's ``splits.csv``: equal when cells share a split.

    The hash is of the file with CRLF line endings, which versions before 2026-12 wrote (LF since), so that a cell
    trained then and one trained now with the same split agree, and so do the fingerprints quoted from then."""
    out = {}
    for cell in plan.cells:
        path = plan.cell_dir(cell) / "splits.csv"
        if path.is_file():
            rows = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            out[cell.id] = hashlib.sha256(rows).hexdigest()[:12]
    return out


def _plot_curves(plan: Plan, path: Path, console: Console | None) -> bool:
    """``curves.png``: every cell's loss and accuracy per epoch (``cxrkit.eval.plots``); False when unavailable."""
    try:
        from cxrkit.eval.curves import plot_training_curves
    except ImportError:
        if console is not None:
            console.print("curves.png skipped: cxrkit.eval.curves.plot_training_curves is not available")
        return False
    runs = {}
    for cell in plan.cells:
        rows = Run(plan.cell_dir(cell)).read_metrics()
        if rows:
            runs[cell.id] = [{k: _number(v) if _number(v) is not None else v for k, v in r.items()} for r in rows]
    if not runs:
        path.unlink(missing_ok=True)
        return False
    plot_training_curves(runs, path, metrics=("loss", "accuracy"), title=f"{plan.spec.name}: training curves")
    return path.is_file()


def write_leaderboard(plan: Plan, console: Console | None = None) -> Path:
    """Write ``leaderboard.{csv,md,html}`` and ``curves.png`` from the cells' files; print the table.

    Returns:
        The path of ``leaderboard.csv``.
    """
    rows = leaderboard_rows(plan)
    columns: list[Column] = columns_for(rows, varying_axes(plan), plan.spec.evaluate.split,
                                        plan.spec.evaluate.checkpoint)
    csv_columns = ["cell", "status", *ALWAYS, *varying_axes(plan)]
    csv_columns += [k for r in rows for k in r if k not in csv_columns]
    csv_columns = list(dict.fromkeys(csv_columns))
    plan.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.root / "leaderboard.csv", csv_text(rows, csv_columns))
    fingerprints = split_fingerprints(plan)
    summary = seed_summary(rows, plan, columns) if "seed" in varying_axes(plan) else None
    atomic_write_text(plan.root / "leaderboard.md", markdown_report(plan, rows, columns, fingerprints, summary))
    curves = _plot_curves(plan, plan.root / "curves.png", console)
    html = html_report(plan, rows, columns, fingerprints, summary, plan.root / "curves.png" if curves else None)
    atomic_write_text(plan.root / "leaderboard.html", html)
    if console is not None:
        _print_table(console, plan, rows, columns, fingerprints)
    return plan.root / "leaderboard.csv"


def _print_table(console: Console, plan: Plan, rows: list[dict[str, Any]], columns: list[Column],
                 fingerprints: dict[str, str]) -> None:
    from rich.table import Table

    table = Table(title=f"{plan.spec.name}: {len(rows)} cells, sorted by {plan.spec.sort}")
    columns = [c for c in columns if not c.key.startswith("first_epoch")]  # the files have them; keep this narrow
    columns, left_out, error_width = fit_columns(columns, rows, console.width, plan.spec.sort)
    for column in columns:
        short = column.key in ("cell", "error")
        widest = content_width(column, rows)  # the floor Rich keeps: values whole, headers wrapped at spaces
        table.add_column(column.header, justify="right" if column.numeric else "left", no_wrap=short,
                         min_width=min(widest, error_width) if column.key == "error" else widest,
                         max_width=error_width if column.key == "error" else None, overflow="ellipsis")
    for row in rows:
        table.add_row(*(column.text(row) for column in columns))
    console.print(table)
    if left_out:
        console.print(f"{left_out} more column(s) in {plan.root / 'leaderboard.md'} (they do not fit "
                      f"{console.width} characters)", highlight=False)
    if len(set(fingerprints.values())) > 1:
        console.print("[yellow]warning: the cells do not all share one split (splits.csv differs)[/]")


ERROR_WIDTH = 48
LEAST_NEEDED = ("training_time", "checkpoint_epoch", "checkpoint_val_accuracy")  # the first to go after the axes


def fit_columns(columns: list[Column], rows: list[dict[str, Any]], width: int,
                sort: str) -> tuple[list[Column], int, int]:
    """The columns whose full text fits ``width`` characters in a table, how many were left out, and the width the
    error column may take (its text is cut with an ellipsis).

    Rich squeezes a table that is too wide until its numbers vanish (an 80-column pipe or CI log). The first to go
    are intervals, then parameter counts, the axis columns (the cell id already names the axes), training time, the
    checkpoint's epoch and its val accuracy, then the other scores from the right; the cell, its status and error,
    and the sort column stay."""

    def natural(column: Column, error_width: int = ERROR_WIDTH) -> int:
        cap = error_width if column.key == "error" else width
        return min(content_width(column, rows), cap) + 3  # a space on each side and a border

    kept = list(columns)
    order = ([c for c in kept if c.kind == "ci"] + [c for c in kept if c.kind == "params"]
             + [c for c in kept if c.kind == "text" and c.key not in ("cell", "status", "error", "training_time")]
             + [c for c in kept if c.key in LEAST_NEEDED and c.key != sort]
             + [c for c in reversed(kept) if c.kind == "score" and c.key not in (sort, *LEAST_NEEDED)])
    least = 12  # the error column gives way down to this before other columns go
    for column in order:
        if sum(natural(c, least) for c in kept) + 1 <= width:
            break
        kept.remove(column)
    others = sum(natural(c) for c in kept if c.key != "error") + 1
    return kept, len(columns) - len(kept), max(least, min(ERROR_WIDTH, width - others - 3))


def content_width(column: Column, rows: list[dict[str, Any]]) -> int:
    """The narrowest ``column`` can be with every value whole: its longest value or longest header word."""
    return max([len(word) for word in column.header.split()] + [len(column.text(row)) for row in rows])
