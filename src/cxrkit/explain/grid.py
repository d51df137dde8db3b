"""Study 3's figure: heatmaps of examples from every (true, predicted) cell of a split's confusion matrix.

The split is predicted once (the same calibrated probabilities and threshold as ``cxr evaluate``); only the examples
shown are explained. Multi-label runs get one 2 x 2 grid per label (absent / present).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrkit.errors import CxrError
from cxrkit.explain.api import ExplainOptions, check_text, explain_batch, verdict_summary
from cxrkit.explain.gradcam import Explainer
from cxrkit.explain.plots import Explained, GridCell, grid_figure
from cxrkit.runs import atomic_write_text, csv_text, safe_name, unique_safe_names
from cxrkit.serve.predictor import Predictor

PICKS = ("confident", "random")


@dataclass
class GridResult:
    """Files written for one grid, and the faithfulness verdicts of its examples (None without the check)."""

    png: Path
    csv: Path
    examples: int
    summary: str | None


def pick_examples(cell_rows: np.ndarray, confidence: np.ndarray, per_cell: int, pick: str,
                  rng: np.random.Generator) -> list[int]:
    """Up to ``per_cell`` row indices of one cell: the most confident predictions, or a seeded random sample."""
    if not len(cell_rows):
        return []
    if pick == "random":
        chosen = rng.choice(cell_rows, size=min(per_cell, len(cell_rows)), replace=False)
        return [int(i) for i in chosen]
    order = np.argsort(-confidence[cell_rows], kind="stable")
    return [int(i) for i in cell_rows[order[:per_cell]]]


def _cells(task: str, labels: Sequence[str], targets: np.ndarray, probs: np.ndarray, decided: list[str],
           label: str | None) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(axis names, rows kept, true index, predicted index, class explained)`` for the grid."""
    if task == "multilabel":
        j = labels.index(label)
        known = np.flatnonzero(~np.isnan(targets[:, j]))
        true = targets[known, j].astype(int)
        predicted = np.asarray([int(label in d.split("|")) for d in decided])[known]
        return ["absent", "present"], known, true, predicted, np.full(len(known), j)
    predicted = np.asarray([labels.index(d) for d in decided])
    return list(labels), np.arange(len(targets)), targets.astype(int), predicted, predicted


def explain_grid(predictor: Predictor, out_dir: str | Path, options: ExplainOptions, data: str | None = None,
                 split: str = "test", label_map: dict[str, str] | None = None, per_cell: int = 3,
                 pick: str = "confident", batch_size: int = 64, console: Any = None) -> list[GridResult]:
    """Write ``grid-<dataset>-<split>-<method>[-<label>].png`` and a CSV of the examples shown.

    Args:
        predictor: the run.
        out_dir: folder for the figure and CSV.
        options: CAM method, layer and faithfulness settings; ``options.targets`` picks the labels of a
            multi-label run (default: every label with positives in the split).
        data: another dataset (external validation), as for ``cxr evaluate``; None for the run's own split.
        split: which split.
        label_map: dataset label -> run label, by name.
        per_cell: examples per cell.
        pick: ``confident`` (the most confident predictions of each cell) or ``random`` (seeded).
        batch_size: images per batch when predicting the split.
        console: rich console for progress.
    """
    from cxrkit.eval.evaluate import mapped_targets, select_data

    if per_cell < 1:
        raise CxrError(f"--per-cell must be at least 1, not {per_cell}")
    if pick not in PICKS:
        raise CxrError(f"--pick must be one of {', '.join(PICKS)}, not {pick!r}")
    ds, ds_name, _, split = select_data(predictor, data, split)
    if not len(ds):
        raise CxrError(f"the {split} split of {ds_name} is empty")
    targets = mapped_targets(ds, predictor.labels, label_map)
    probs = predictor.predict_dataset(ds, batch_size, console)
    decided = predictor.decide(probs)
    results = []
    with Explainer(predictor.model, predictor.task, options.method, options.layer, predictor.temperature) as ex:
        for label in _grid_labels(predictor, targets, options):
            names, rows, true, predicted, explained = _cells(predictor.task, predictor.labels, targets, probs,
                                                            decided, label)
            rng = np.random.default_rng(options.seed)
            confidence = probs[rows, explained]
            cells: dict[tuple[str, str], GridCell] = {}
            csv_rows: list[dict[str, Any]] = []
            for t, p in itertools.product(range(len(names)), repeat=2):
                members = np.flatnonzero((true == t) & (predicted == p))
                chosen = [int(rows[i]) for i in pick_examples(members, confidence, per_cell, pick, rng)]
                examples = _explain_examples(ex, predictor, ds, chosen, [int(explained[i]) for i in chosen],
                                             names[p], options) if chosen else []
                for example, index in zip(examples, chosen):
                    item = ds.items[index]
                    csv_rows.append({"source": item.source, "patient": item.patient, "true": names[t],
                                     "predicted": names[p], "explained": example.label,
                                     "probability": round(example.probability, 6), **example.check})
                cells[(names[t], names[p])] = GridCell(names[t], names[p], len(members), examples)
            results.append(_write_grid(Path(out_dir), ds_name, split, label, predictor.labels, names, cells,
                                       csv_rows, per_cell, ex, pick, options))
    return results


def _explain_examples(ex: Explainer, predictor: Predictor, ds: Any, indices: list[int], classes: list[int],
                      predicted: str, options: ExplainOptions) -> list[Explained]:
    """Overlays of dataset items (by index) for the given classes, with the probabilities of the pass explained."""
    from cxrkit.data.transforms import input_box

    images = [ds.read(i) for i in indices]
    probs, maps = explain_batch(ex, predictor, images, options, [[c] for c in classes])
    examples = []
    for index, image, p, (m,) in zip(indices, images, probs, maps):
        examples.append(Explained(image, m.heatmap, input_box(predictor.preprocessing, *image.size),
                                  predictor.labels[m.index], float(p[m.index]), predicted,
                                  Path(ds.items[index].source).name, check_text(m.check), m.check or {}))
    return examples


def _grid_labels(predictor: Predictor, targets: np.ndarray, options: ExplainOptions) -> list[str | None]:
    if predictor.task != "multilabel":
        return [None]
    if options.targets and list(options.targets) != ["all"]:
        unknown = [t for t in options.targets if t not in predictor.labels]
        if unknown:
            raise CxrError(f"unknown label {', '.join(unknown)}; the run's labels are {', '.join(predictor.labels)}")
        return list(options.targets)
    return [n for j, n in enumerate(predictor.labels) if np.nansum(targets[:, j]) > 0]


def _write_grid(out_dir: Path, ds_name: str, split: str, label: str | None, labels: Sequence[str], names: list[str],
                cells: dict[tuple[str, str], GridCell], csv_rows: list[dict[str, Any]], per_cell: int,
                ex: Explainer, pick: str, options: ExplainOptions) -> GridResult:
    from cxrkit.eval.plots import save_figure

    checks = [r for r in csv_rows if r.get("verdict")]
    summary = verdict_summary(checks) if checks else None
    title = f"{ex.method_name} at {ex.layer_name} · {ds_name} {split}" + (f" · {label}" if label else "")
    title += f" · {pick} examples per cell"
    if summary:
        title += f"\nremoving the top {options.percent:g}% of each heatmap vs a random region: {summary}"
    rows, columns = (f"true {label}", f"predicted {label}") if label else ("true", "predicted")
    fig = grid_figure(names, cells, per_cell, ex.method_name, title, options.opacity, rows, columns)
    stem = safe_name(f"grid-{ds_name}-{split}-{options.method}")
    if label:  # one grid per label of a multilabel run, each in its own file (labels 病毒 and 肺炎: x and x-2)
        stem += "-" + unique_safe_names(labels)[labels.index(label)]
    png = save_figure(fig, out_dir / f"{stem}.png")
    csv_path = out_dir / f"{stem}.csv"
    columns = ["source", "patient", "true", "predicted", "explained", "probability", "drop_heatmap", "drop_random",
               "score", "verdict"]
    atomic_write_text(csv_path, csv_text([{c: r.get(c, "") for c in columns} for r in csv_rows], columns))
    return GridResult(png, csv_path, len(csv_rows), summary)


__all__ = ["GridResult", "explain_grid", "pick_examples"]
