"""Evaluation metrics for binary, multiclass and multilabel predictions (pure numpy / scikit-learn).

:func:`compute_metrics` turns targets and predicted probabilities into one JSON-ready dict (plain floats, ints,
lists and dicts; undefined values are ``None``), :func:`choose_threshold` picks a decision threshold for a binary task
on the validation split, and :func:`format_metrics_table` gives the short summary the CLI prints.

Every metric comes from :mod:`sklearn.metrics`. Undefined values (an AUC when only one class is present, a recall
with no positives) are ``None`` rather than an exception or a warning: class presence is checked before calling
scikit-learn, and rates use ``zero_division`` explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    confusion_matrix,
    log_loss,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from cxrkit.errors import CxrError
from cxrkit.eval.checks import (
    TASKS,
    _check_class_targets,
    _check_labels,
    _check_multilabel_targets,
    _check_probs,
    _check_threshold,
)

THRESHOLD_METHODS: tuple[str, ...] = ("youden", "sensitivity")


def compute_metrics(
    task: str,
    labels: Sequence[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Computes every evaluation metric of one split.

    Args:
        task: ``binary``, ``multiclass`` or ``multilabel``.
        labels: label names; column ``j`` of ``probs`` belongs to ``labels[j]``. For binary tasks ``labels[1]`` is
            the positive class.
        y_true: binary / multiclass: class indices, shape ``[n]``. Multilabel: shape ``[n, n_labels]`` with 0, 1 or
            NaN (unknown); unknown entries are left out of that label's metrics.
        probs: binary / multiclass: softmax probabilities ``[n, n_labels]``. Multilabel: sigmoid probabilities
            ``[n, n_labels]``.
        threshold: binary: a sample is positive when ``probs[:, 1] >= threshold``; multilabel: a label is predicted
            when its probability is ``>= threshold``. Defaults to 0.5. Must be ``None`` for multiclass tasks, which
            predict the most probable class.

    Returns:
        A JSON-serialisable dict with ``task``, ``labels``, ``n``, ``threshold``, ``accuracy``, ``auc``,
        ``auc_per_label``, ``average_precision``, ``average_precision_per_label``, ``f1_macro``, ``f1_weighted``,
        ``precision_macro``, ``recall_macro``, ``log_loss``, ``confusion_matrix``, ``confusion_matrix_normalized``,
        ``per_class`` and ``output_distribution``; binary adds ``positive``, ``sensitivity``, ``specificity``,
        ``ppv`` and ``npv``; multilabel adds ``subset_accuracy``. NaN becomes ``None``.

    Raises:
        ValueError: when the task, labels, shapes or values are inconsistent.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    names = _check_labels(task, labels)
    probs = _check_probs(task, probs, len(names))
    threshold = _check_threshold(task, threshold)
    if task == "multilabel":
        targets = _check_multilabel_targets(y_true, probs.shape)
        result = _multilabel_metrics(names, targets, probs, threshold)
    else:
        classes = _check_class_targets(y_true, probs.shape)
        result = _single_label_metrics(task, names, classes, probs, threshold)
    return _to_json(result)


def choose_threshold(
    y_true: np.ndarray,
    p_positive: np.ndarray,
    method: str = "youden",
    target_sensitivity: float | None = None,
) -> float:
    """Picks a decision threshold for a binary task from validation scores.

    The candidates are the thresholds of :func:`sklearn.metrics.roc_curve`, i.e. the distinct scores; a sample is
    positive when its score is ``>=`` the threshold.

    Args:
        y_true: 0 / 1 targets, shape ``[n]``.
        p_positive: probability of the positive class, shape ``[n]``.
        method: ``youden`` maximises Youden's J = sensitivity + specificity - 1 (Youden 1950, "Index for rating
            diagnostic tests"); ``sensitivity`` returns the highest threshold whose sensitivity reaches
            ``target_sensitivity``.
        target_sensitivity: in ``(0, 1]``; giving it selects the ``sensitivity`` method.

    Returns:
        The chosen threshold (one of the scores).

    Raises:
        ValueError: on an unknown method, a missing or out-of-range target, or inconsistent inputs.
        CxrError: when ``y_true`` holds only one class, so no threshold can be chosen.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"method must be one of {THRESHOLD_METHODS}, not {method!r}")
    if target_sensitivity is not None:
        if not 0.0 < target_sensitivity <= 1.0:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        method = "sensitivity"
    elif method == "sensitivity":
        raise ValueError("method 'sensitivity' needs a target_sensitivity")
    targets = np.asarray(y_true).ravel()
    scores = np.asarray(p_positive, dtype=np.float64).ravel()
    if targets.shape != scores.shape:
        raise ValueError(f"y_true has {targets.size} values but p_positive has {scores.size}")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("y_true must hold only 0 and 1")
    present = np.unique(targets)
    if present.size < 2:
        raise CxrError(f"cannot choose a threshold: the validation targets hold only class {present.tolist()}")
    fpr, tpr, thresholds = roc_curve(targets, scores, drop_intermediate=False)
    # The first point (threshold +inf) predicts nothing positive; it is never a useful choice.
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if method == "youden":
        best = int(np.argmax(tpr - fpr))  # ties go to the highest threshold
    else:
        best = int(np.argmax(tpr >= target_sensitivity - 1e-12))  # thresholds decrease, tpr never does
    return float(thresholds[best])


def format_metrics_table(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """Gives the short summary of a :func:`compute_metrics` result as (name, formatted value) rows.

    Args:
        metrics: a dict from :func:`compute_metrics`, or the same read back from ``metrics.json``.

    Returns:
        Rows for samples, accuracy (and subset accuracy for multilabel), AUC, F1 macro, sensitivity, specificity
        and threshold for binary tasks, then the recall of each label. Undefined values read ``n/a``.
    """
    rows = [("samples", str(metrics["n"])), ("accuracy", _format_value(metrics["accuracy"]))]
    if metrics["task"] == "multilabel":
        rows.append(("subset accuracy", _format_value(metrics["subset_accuracy"])))
    rows += [("AUC", _format_value(metrics["auc"])), ("F1 macro", _format_value(metrics["f1_macro"]))]
    if metrics["task"] == "binary":
        rows += [(name, _format_value(metrics[name])) for name in ("sensitivity", "specificity", "threshold")]
    rows += [(f"recall {name}", _format_value(metrics["per_class"][name]["recall"])) for name in metrics["labels"]]
    return rows


def _single_label_metrics(
    task: str, names: list[str], y: np.ndarray, probs: np.ndarray, threshold: float | None
) -> dict[str, Any]:
    classes = list(range(len(names)))
    pred = (probs[:, 1] >= threshold).astype(int) if task == "binary" else probs.argmax(axis=1)
    # Keys are the class indices as strings, so a label called e.g. "accuracy" cannot collide with a summary row.
    report = classification_report(y, pred, labels=classes, output_dict=True, zero_division=0)
    # macro averages run over the classes that occur (in the targets or the predictions), as scikit-learn's own
    # default does: a class absent from the set and never predicted has no F1 to average (an external set with
    # one class, every image right, used to score F1 macro 0.5)
    occurring = sorted(set(np.unique(y).tolist()) | set(np.unique(pred).tolist()))
    macro_precision, macro_recall, macro_f1, _ = precision_recall_fscore_support(
        y, pred, labels=occurring, average="macro", zero_division=0)
    scored = [1] if task == "binary" else classes  # binary: only the positive class is scored
    auc = {names[c]: _binary_auc(y == c, probs[:, c]) for c in scored}
    average_precision = {names[c]: _binary_average_precision(y == c, probs[:, c]) for c in scored}
    result = {
        "task": task,
        "labels": names,
        "n": len(y),
        "threshold": threshold,
        "accuracy": accuracy_score(y, pred),
        "auc": _mean_defined(auc.values()),
        "auc_per_label": auc,
        "average_precision": _mean_defined(average_precision.values()),
        "average_precision_per_label": average_precision,
        "f1_macro": float(macro_f1),
        "f1_weighted": report["weighted avg"]["f1-score"],
        "precision_macro": float(macro_precision),
        "recall_macro": float(macro_recall),
        "log_loss": log_loss(y, probs, labels=classes),
        "confusion_matrix": confusion_matrix(y, pred, labels=classes),
        "confusion_matrix_normalized": confusion_matrix(y, pred, labels=classes, normalize="true"),
        "per_class": {name: _report_row(report[str(c)]) for c, name in zip(classes, names, strict=True)},
        "output_distribution": dict(zip(names, np.bincount(pred, minlength=len(names)) / len(pred), strict=True)),
    }
    if task == "binary":
        result.update(_binary_rates(names, y, pred))
    return result


def _binary_rates(names: list[str], y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    # zero_division=nan: a rate with an empty denominator is undefined (None), not 0.
    precision, recall, _, _ = precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=np.nan)
    return {
        "positive": names[1],
        "sensitivity": recall[1],
        "specificity": recall[0],
        "ppv": precision[1],
        "npv": precision[0],
    }


def _multilabel_metrics(names: list[str], y: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, Any]:
    pred = (probs >= threshold).astype(int)
    known = ~np.isnan(y)
    per_label = {
        name: _label_metrics(y[known[:, j], j].astype(int), probs[known[:, j], j], pred[known[:, j], j])
        for j, name in enumerate(names)
    }
    complete = known.all(axis=1)
    supports = np.array([m["support"] for m in per_label.values()], dtype=np.float64)
    f1s = np.array([_nan_if_none(m["f1"]) for m in per_label.values()])
    defined = ~np.isnan(f1s)
    weighted_f1 = np.average(f1s[defined], weights=supports[defined]) if supports[defined].sum() > 0 else None
    auc = {name: m["auc"] for name, m in per_label.items()}
    average_precision = {name: m["average_precision"] for name, m in per_label.items()}
    return {
        "task": "multilabel",
        "labels": names,
        "n": len(y),
        "threshold": threshold,
        "accuracy": _mean_defined(m["accuracy"] for m in per_label.values()),
        "subset_accuracy": accuracy_score(y[complete].astype(int), pred[complete]) if complete.any() else None,
        "auc": _mean_defined(auc.values()),
        "auc_per_label": auc,
        "average_precision": _mean_defined(average_precision.values()),
        "average_precision_per_label": average_precision,
        "f1_macro": _mean_defined(m["f1"] for m in per_label.values()),
        "f1_weighted": weighted_f1,
        "precision_macro": _mean_defined(m["precision"] for m in per_label.values()),
        "recall_macro": _mean_defined(m["recall"] for m in per_label.values()),
        # Mean binary cross-entropy over all known entries, as the masked BCE training loss.
        "log_loss": log_loss(y[known].astype(int), probs[known], labels=[0, 1]) if known.any() else None,
        "confusion_matrix": {name: m["confusion_matrix"] for name, m in per_label.items()},
        "confusion_matrix_normalized": {name: m["confusion_matrix_normalized"] for name, m in per_label.items()},
        "per_class": {name: {key: m[key] for key in _PER_CLASS_KEYS} for name, m in per_label.items()},
        "output_distribution": dict(zip(names, pred.mean(axis=0), strict=True)),
    }


_PER_CLASS_KEYS = ("precision", "recall", "f1", "support", "n_known")


def _label_metrics(y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Metrics of one multilabel column, restricted to its known entries."""
    if len(y) == 0:
        undefined = dict.fromkeys(("accuracy", "auc", "average_precision", "precision", "recall", "f1"))
        matrices = {"confusion_matrix": np.zeros((2, 2), dtype=int), "confusion_matrix_normalized": np.zeros((2, 2))}
        return {**undefined, "support": 0, "n_known": 0, **matrices}
    # zero_division=nan: a label with no positives has no recall, and one also never predicted has no precision or
    # F1; they are None (n/a) and left out of the macro means, as a class that does not occur is for multi-class
    precision, recall, f1 = (None if math.isnan(v) else float(v) for v in precision_recall_fscore_support(
        y, pred, average="binary", pos_label=1, zero_division=np.nan)[:3])
    return {
        "accuracy": accuracy_score(y, pred),
        "auc": _binary_auc(y == 1, p),
        "average_precision": _binary_average_precision(y == 1, p),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": int(y.sum()),
        "n_known": len(y),
        # [[tn, fp], [fn, tp]]: rows are the true class (0, 1), columns the predicted one.
        "confusion_matrix": multilabel_confusion_matrix(y, pred, labels=[1])[0],
        "confusion_matrix_normalized": confusion_matrix(y, pred, labels=[0, 1], normalize="true"),
    }


def _binary_auc(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, or None when only one class is present."""
    if is_positive.all() or not is_positive.any():
        return None
    return float(roc_auc_score(is_positive, scores))


def _binary_average_precision(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Average precision, or None when there is no positive."""
    if not is_positive.any():
        return None
    return float(average_precision_score(is_positive, scores))


def _report_row(row: dict[str, float]) -> dict[str, Any]:
    return {
        "precision": row["precision"],
        "recall": row["recall"],
        "f1": row["f1-score"],
        "support": int(row["support"]),
    }


def _mean_defined(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None (nor NaN), or None when there are none."""
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(defined)) if defined else None


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _to_json(value: Any) -> Any:
    """Converts numpy values to plain Python, NaN and infinities to None."""
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_to_json(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
