"""Leaderboard rendering: the displayed columns, a Markdown table writer and a self-contained, escaped HTML page."""

from __future__ import annotations

import base64
import html
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from cxrkit.compare.runner import Plan


@dataclass(frozen=True)
class Column:
    """A displayed column: ``kind`` is text, score (4 decimals), count (a whole number, such as an epoch), ci
    (``low-high`` of ``key`` + ``_ci95_low`` / ``_high``), or params (``trainable / total``)."""

    key: str
    header: str
    kind: str = "text"

    @property
    def numeric(self) -> bool:
        return self.kind != "text"

    def text(self, row: dict[str, Any]) -> str:
        """The cell of ``row`` in this column as displayed text (``-`` when missing)."""
        if self.kind == "ci":
            low, high = row.get(f"{self.key}_ci95_low"), row.get(f"{self.key}_ci95_high")
            return "-" if low is None or high is None else f"{low:.3f}–{high:.3f}"
        if self.kind == "params":
            trainable, total = row.get("trainable_params"), row.get("total_params")
            return "-" if trainable is None or total is None else f"{trainable:,} / {total:,}"
        value = row.get(self.key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if self.kind == "count":
            return str(int(value))
        return f"{value:.4f}" if self.kind == "score" else str(value)



def _shown(path: object) -> str | None:
    """A path as the reader typed it: relative to the working directory when it lies below it."""
    if path is None:
        return None
    from pathlib import Path

    try:
        return str(Path(str(path)).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)

def columns_for(rows: list[dict[str, Any]], varying: list[str], split: str, checkpoint: str = "best") -> list[Column]:
    """The displayed columns; status and error only when some cell is not done, intervals only when present, the
    val AUC only when some run recorded one. The val columns of the evaluated ``checkpoint`` name it: ``val AUC at
    best.pt``."""
    unfinished = any(r["status"] != "done" for r in rows)
    columns = [Column("cell", "cell")]
    columns += [Column("status", "status")] if unfinished else []
    columns += [Column(axis, axis) for axis in ("backbone", "weights", *varying)]
    columns += [Column("first_epoch_train_loss", "1st-epoch train loss", "score"),
                Column("first_epoch_val_accuracy", "1st-epoch val acc", "score"),
                Column("checkpoint_epoch", f"{checkpoint}.pt epoch", "count"),
                Column("checkpoint_val_accuracy", f"val acc at {checkpoint}.pt", "score")]
    if any(r.get("checkpoint_val_auc") is not None for r in rows):
        columns.append(Column("checkpoint_val_auc", f"val AUC at {checkpoint}.pt", "score"))
    for key, header in (("accuracy", "acc"), ("f1_macro", "F1 (macro)"), ("auc", "AUC")):
        columns.append(Column(f"{split}_{key}", f"{split} {header}", "score"))
        if key != "f1_macro" and any(r.get(f"{split}_{key}_ci95_low") is not None for r in rows):
            columns.append(Column(f"{split}_{key}", f"{split} {header} 95% CI", "ci"))
    columns += [Column("training_time", "training time"), Column("params", "trainable / total params", "params")]
    if any(r.get("error") for r in rows):
        columns.append(Column("error", "error"))
    return columns


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def seed_summary(rows: list[dict[str, Any]], plan: Plan, columns: list[Column]) -> tuple[list[str], list[list[str]]]:
    """Mean ± SD over seeds of the scores, one row per combination of the other axes (finished cells only).

    Returns:
        ``(headers, rows of text)``, best mean of the sort key first.
    """
    axes = [c.key for c in columns if c.kind == "text" and c.key not in ("cell", "status", "seed", "error",
                                                                               "training_time")]
    scores = [c for c in columns if c.kind == "score"]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "done":
            groups.setdefault(tuple(str(row.get(a)) for a in axes), []).append(row)
    split = plan.spec.evaluate.split
    sort_key = plan.spec.sort.replace("test_", f"{split}_", 1)

    def mean_of(group: list[dict[str, Any]], key: str) -> float:
        values = [r[key] for r in group if r.get(key) is not None]
        return statistics.fmean(values) if values else -math.inf

    ordered = sorted(groups.items(), key=lambda item: -mean_of(item[1], sort_key))
    table = [[*names, str(len(group)), *(_mean_sd([r[c.key] for r in group if r.get(c.key) is not None])
                                          for c in scores)] for names, group in ordered]
    return [*axes, "seeds", *(c.header for c in scores)], table


def _numeric_after(headers: list[str], first: str) -> list[bool]:
    start = headers.index(first)
    return [i >= start for i in range(len(headers))]


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: list[str], rows: list[list[str]], numeric: list[bool] | None = None) -> str:
    """A GitHub-flavoured Markdown table; ``numeric`` columns are right-aligned."""
    numeric = numeric or [False] * len(headers)
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _override_text(overrides: list[tuple[str, Any]]) -> str:
    def value(v: Any) -> str:
        if not isinstance(v, (dict, list)):
            return "null" if v is None else str(v)
        return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()

    return ", ".join(f"{k}={value(v)}" for k, v in overrides) or "(nothing)"


def _cell_lines(plan: Plan) -> list[tuple[str, str]]:
    """(label, overrides) for the overrides every cell shares, then for each cell's axis values."""
    spec = plan.spec
    common = [("every cell", _override_text([*spec.set, *spec.overrides]))] if spec.set or spec.overrides else []
    return common + [(cell.id, _override_text(cell.overrides)) for cell in plan.cells]


def _split_note(fingerprints: dict[str, str]) -> str:
    distinct = set(fingerprints.values())
    if not distinct:
        return "No cell has trained yet."
    if len(distinct) == 1:
        return f"All {len(fingerprints)} cells with a split share one split (splits.csv sha256 {distinct.pop()})."
    return "Warning: the cells do not all share one split: " + ", ".join(f"{k} {v}" for k, v in fingerprints.items())


def _intro(plan: Plan, rows: list[dict[str, Any]]) -> list[str]:
    spec = plan.spec
    split = spec.evaluate.split
    sizes = {r.get(f"{split}_images") for r in rows if r.get(f"{split}_images") is not None}
    images = f" ({', '.join(str(s) for s in sorted(sizes))} images)" if sizes else ""
    done = sum(r["status"] == "done" for r in rows)
    return [
        f"Spec: {_shown(spec.path) or '-'}; base recipe: {_shown(spec.recipe) or '(defaults)'}.",
        f"Evaluated on the {split} split{images} with the {spec.evaluate.checkpoint} checkpoint; "
        f"{done} of {len(rows)} cells done; sorted by {spec.sort}, best first.",
        "Training time is the sum of train and validation seconds over all epochs; parameters are those trainable "
        "in the last stage.",
    ]


def markdown_report(plan: Plan, rows: list[dict[str, Any]], columns: list[Column], fingerprints: dict[str, str],
                    summary: tuple[list[str], list[list[str]]] | None) -> str:
    """``leaderboard.md``: the table, the mean over seeds (when seeds vary), the split check and each cell's
    overrides."""
    parts = [f"# {plan.spec.name}\n"]
    if plan.spec.description:
        parts.append(plan.spec.description.strip() + "\n")
    parts.append("\n".join(_intro(plan, rows)) + "\n")
    parts.append(markdown_table([c.header for c in columns], [[c.text(r) for c in columns] for r in rows],
                                [c.numeric for c in columns]))
    if summary is not None:
        headers, table = summary
        parts.append("## Mean ± SD over seeds\n")
        parts.append(markdown_table(headers, table, _numeric_after(headers, "seeds")))
    parts.append(_split_note(fingerprints) + "\n")
    parts.append("## Cells\n")
    parts.append("\n".join(f"- {label}: `{text}`" for label, text in _cell_lines(plan)) + "\n")
    return "\n".join(parts)


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em; color: #1b1f23; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fff0f0; } tr.pending td { color: #6a737d; }
p.note { color: #57606a; } code { font-size: 0.9em; } img { max-width: 100%; }
"""


def _html_table(headers: list[str], rows: list[list[str]], numeric: list[bool],
                classes: list[str] | None = None) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{esc(classes[i])}"' if classes and classes[i] else ""
        cells = "".join(f'<td class="num">{esc(v)}</td>' if n else f"<td>{esc(v)}</td>" for v, n in zip(row, numeric))
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_report(plan: Plan, rows: list[dict[str, Any]], columns: list[Column], fingerprints: dict[str, str],
                summary: tuple[list[str], list[list[str]]] | None, curves: Path | None) -> str:
    """``leaderboard.html``: one self-contained page (inline CSS, curves embedded as a data URI), all text escaped."""
    esc = html.escape
    status_class = {"failed": "failed", "new": "pending", "incomplete": "pending", "trained": "pending"}
    parts = [f"<h1>{esc(plan.spec.name)}</h1>"]
    if plan.spec.description:
        parts.append(f"<p>{esc(plan.spec.description.strip())}</p>")
    parts += [f'<p class="note">{esc(line)}</p>' for line in _intro(plan, rows)]
    parts.append(_html_table([c.header for c in columns], [[c.text(r) for c in columns] for r in rows],
                             [c.numeric for c in columns], [status_class.get(r["status"], "") for r in rows]))
    if summary is not None:
        headers, table = summary
        parts.append("<h2>Mean ± SD over seeds</h2>")
        parts.append(_html_table(headers, table, _numeric_after(headers, "seeds")))
    parts.append(f'<p class="note">{esc(_split_note(fingerprints))}</p>')
    if curves is not None and curves.is_file():
        data = base64.b64encode(curves.read_bytes()).decode("ascii")
        parts.append(f'<h2>Training curves</h2><img alt="training curves" src="data:image/png;base64,{data}">')
    parts.append("<h2>Cells</h2><ul>")
    parts += [f"<li>{esc(label)}: <code>{esc(text)}</code></li>" for label, text in _cell_lines(plan)]
    parts.append("</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(plan.spec.name)} leaderboard</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
