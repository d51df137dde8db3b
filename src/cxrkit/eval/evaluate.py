"""Evaluate a run on a split of its own data or on another dataset whose labels map by name."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from cxrkit import pipeline
from cxrkit.config import DataConfig
from cxrkit.data.base import LabelledImages
from cxrkit.errors import CxrError
from cxrkit.locks import exclusive
from cxrkit.runs import atomic_write_json, atomic_write_text, check_writable, csv_text, replaced_files
from cxrkit.serve.predictor import Predictor


def _same_root(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def select_data(predictor: Predictor, data: str | None, split: str) -> tuple[LabelledImages, str, bool, str]:
    """The images to evaluate and a name for them.

    Without ``data`` (or with the training data) the run's saved split is used. Another dataset is external
    validation: its own ``split`` when it has one, else all of it.

    Returns:
        ``(images, dataset name, external, split)``; the split is ``all`` for an external dataset without splits.
    """
    from cxrkit.data.splits import load_splits

    cfg = pipeline.expand_paths(predictor.recipe.data)
    if data is None or _same_root(data, cfg.root):
        ds = pipeline.load_data(cfg)
        splits = load_splits(predictor.run.file("splits.csv"), ds)
        if split not in splits or not len(splits[split]):
            have = ", ".join(name for name, idx in splits.items() if len(idx)) or "none"
            raise CxrError(f"run {predictor.run.path} has no {split} split (it has {have})")
        return ds.subset(splits[split]), ds.spec.name, False, split
    task = cfg.task if cfg.task == "normal-bacterial-viral" else "auto"
    ds = pipeline.load_data(DataConfig(root=data, task=task, name=cfg.name if cfg.format == "medmnist" else None))
    note = ds.skipped_note(f" in {data}")
    if note:  # as cxr train says it of the training data
        from cxrkit.console import notes_console

        notes_console().print(note, highlight=False)
    own = [i for i, it in enumerate(ds.items) if it.split == split]
    if any(it.split for it in ds.items):
        if not own:
            raise CxrError(f"dataset {data} has no {split} split")
        return ds.subset(own), ds.spec.name, True, split
    return ds, ds.spec.name, True, "all"


def mapped_targets(ds: LabelledImages, model_labels: list[str], label_map: dict[str, str] | None) -> np.ndarray:
    """The dataset's targets expressed in the model's labels (by name).

    Multi-label: a model label is positive when any dataset label mapped onto it is, negative when all are known
    negatives, else unknown (NaN, as is a model label no dataset label maps onto); dataset labels the model does not
    have are left out, with a note."""
    from cxrkit.data.dataset import label_mapping

    multilabel = ds.spec.task == "multilabel"
    index = label_mapping(list(ds.spec.labels), model_labels, label_map, unmapped_ok=multilabel)
    if all(col is None for col in index):  # no label in common: the error says which labels each side has
        label_mapping(list(ds.spec.labels), model_labels, label_map)
    targets = ds.targets()
    if not multilabel:
        return np.asarray(index, dtype=np.int64)[targets]
    if left := [label for label, col in zip(ds.spec.labels, index) if col is None]:
        from cxrkit.console import notes_console

        notes_console().print(f"note: {len(left)} of the dataset's labels are not the model's and are left out: "
                              + ", ".join(left), highlight=False)
    out = np.full((len(ds), len(model_labels)), np.nan, dtype=np.float32)
    for model_col in range(len(model_labels)):
        sources = targets[:, [i for i, col in enumerate(index) if col == model_col]]
        if sources.shape[1]:
            known = np.where(np.isnan(sources).any(axis=1), np.nan, 0.0)
            out[:, model_col] = np.where((sources == 1).any(axis=1), 1.0, known)
    return out


def _prediction_rows(ds: LabelledImages, labels: list[str], targets: np.ndarray, probs: np.ndarray,
                     decided: list[str], task: str) -> list[dict[str, Any]]:
    rows = []
    for item, t, p, label in zip(ds.items, targets, probs, decided):
        true = "|".join(n for n, v in zip(labels, t) if v == 1) if task == "multilabel" else labels[int(t)]
        row = {"source": item.source, "patient": item.patient, "true": true, "predicted": label}
        row.update({f"p_{n}": float(q) for n, q in zip(labels, p)})  # unrounded: metrics.json recomputes from it
        rows.append(row)
    return rows


def evaluate_run(
    predictor: Predictor | str | os.PathLike, data: str | None = None, split: str = "test", name: str | None = None,
    label_map: dict[str, str] | None = None, batch_size: int = 64, console: Any = None,
) -> tuple[dict[str, Any], Path]:
    """Predict a split with the run's calibrated probabilities and threshold; write ``eval/<name>/`` (default
    ``<dataset>-<split>``, followed by the engine unless ``torch`` and the checkpoint unless ``best``).

    Besides :func:`~cxrkit.eval.metrics.compute_metrics`, ``metrics.json`` holds ``ci95`` (percentile bootstrap over
    patients, seeded), ``ece`` (after the run's temperature scaling), ``temperature`` and the ``reliability`` curve.

    Args:
        predictor: The run, loaded (or its directory, loaded with the defaults: checkpoint ``best``, PyTorch).

    Returns:
        The metrics and the folder holding ``metrics.json``, ``predictions.csv`` and the figures.
    """
    if not isinstance(predictor, Predictor):
        predictor = Predictor(predictor)
    from cxrkit.eval.bootstrap import bootstrap_ci
    from cxrkit.eval.calibration import expected_calibration_error, reliability_curve
    from cxrkit.eval.metrics import compute_metrics

    ds, ds_name, external, split = select_data(predictor, data, split)
    if not len(ds):
        raise CxrError(f"nothing to evaluate: the {split} split of {ds_name} is empty")
    # the engine and checkpoint where they are not the defaults: evaluating one split with two of them keeps both
    chosen = [value for value, default in ((predictor.engine, "torch"), (predictor.checkpoint, "best"))
              if value != default]
    name = name or "-".join([ds_name, split, *chosen])
    try:  # before the work, not after it
        check_writable(predictor.run.eval_path(name) / "metrics.json")
    except CxrError as err:
        raise CxrError(f"{err}; cxr evaluate keeps its results in the run, so evaluate a copy of the run that can be "
                       "written") from None
    targets = mapped_targets(ds, predictor.labels, label_map)
    probs = predictor.predict_dataset(ds, batch_size, console)
    task, labels, threshold = predictor.task, predictor.labels, predictor.threshold
    metrics = compute_metrics(task, labels, targets, probs, threshold=threshold)
    patients = np.asarray([it.patient for it in ds.items])
    reliability = reliability_curve(task, targets, probs)
    metrics.update({
        "ci95": bootstrap_ci(task, labels, targets, probs, threshold=threshold, groups=patients, seed=0),
        "ece": expected_calibration_error(task, targets, probs), "temperature": predictor.temperature,
        # as in labels.json; "default" for the 0.5 of an uncalibrated binary run and of every multi-label one
        "threshold_method": predictor.labels_info.get("threshold_method") or (None if metrics["threshold"] is None
                                                                                else "default"),
        "reliability": reliability,
    })
    metrics.update({
        "run": predictor.run.name, "checkpoint": predictor.checkpoint, "engine": predictor.engine,
        "dataset": ds_name, "split": split,
        "external": external, "data": str(data or predictor.recipe.data.root or predictor.recipe.data.name),
        "patients": len({it.patient for it in ds.items}), "label_map": label_map or {},
        "recipe": {"backbone": predictor.recipe.model.backbone, "weights": predictor.recipe.model.weights,
                   "stages": [dataclasses.asdict(s)["trainable"] for s in predictor.recipe.stages]},
    })
    out = predictor.run.eval_dir(name)
    rows = _prediction_rows(ds, predictor.labels, targets, probs, predictor.decide(probs), predictor.task)
    from cxrkit.eval.plots import write_eval_figures

    # an earlier evaluation under this name is replaced as a whole (its figures, its report go), so that a folder
    # never mixes two, and only once the new one is written: one that fails (a full disk) leaves the earlier one;
    # metrics.json, put in place last, marks the folder complete
    with evaluation_lock(out, console), replaced_files(out, "metrics.json") as new:
        atomic_write_text(new / "predictions.csv", csv_text(rows))
        write_eval_figures(new, task, labels, targets, probs, metrics, reliability)
        atomic_write_json(new / "metrics.json", metrics)
    return metrics, out


def evaluation_lock(out: Path, console: Any = None) -> contextlib.AbstractContextManager[None]:
    """Held while an evaluation writes ``out`` (``RUN/eval/<name>``): a second evaluation under the same name waits
    for it (saying so on ``console``), rather than removing its files half-way as an earlier evaluation's."""
    from cxrkit.console import notes_console

    return exclusive(out.parent / f".{out.name}.lock", lambda who: f"waiting for {who}, which is writing {out}",
                     lambda note: (console or notes_console()).print(note, highlight=False))
