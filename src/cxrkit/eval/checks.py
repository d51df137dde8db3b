"""Checks of evaluation inputs (tasks, labels, probabilities, targets, thresholds), shared by the metrics, the
bootstrap and calibration. numpy only: applying a run's calibration when predicting imports this, not scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TASKS: tuple[str, ...] = ("binary", "multiclass", "multilabel")
DEFAULT_THRESHOLD = 0.5
_PROB_TOLERANCE = 1e-6  # float32 softmax / sigmoid outputs may overshoot [0, 1] by a rounding error
_ROW_SUM_TOLERANCE = 1e-3  # softmax rows must sum to one up to this; they are then renormalised exactly


def _check_labels(task: str, labels: Sequence[str]) -> list[str]:
    names = [str(name) for name in labels]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate label names in {names}")
    minimum = 1 if task == "multilabel" else 2
    if len(names) < minimum or (task == "binary" and len(names) != 2):
        raise ValueError(f"a {task} task cannot have the labels {names}")
    return names


def _check_probs(task: str, probs: np.ndarray, n_labels: int) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != n_labels or probs.shape[0] == 0:
        raise ValueError(f"probs must have shape [n > 0, {n_labels}], got {list(probs.shape)}")
    if not np.isfinite(probs).all():
        raise ValueError("probs must be finite")
    if probs.min() < -_PROB_TOLERANCE or probs.max() > 1 + _PROB_TOLERANCE:
        raise ValueError(f"probs must lie in [0, 1], got values in [{probs.min()}, {probs.max()}]")
    probs = np.clip(probs, 0.0, 1.0)
    if task == "multilabel":
        return probs
    sums = probs.sum(axis=1, keepdims=True)
    if np.abs(sums - 1.0).max() > _ROW_SUM_TOLERANCE:
        raise ValueError(f"{task} probs must be softmax probabilities whose rows sum to 1")
    return probs / sums


def _check_threshold(task: str, threshold: float | None) -> float | None:
    if task == "multiclass":
        if threshold is not None:
            raise ValueError("a multiclass task predicts the most probable class; it takes no threshold")
        return None
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return threshold


def _check_class_targets(y_true: np.ndarray, probs_shape: tuple[int, ...]) -> np.ndarray:
    y = np.asarray(y_true)
    n, n_labels = probs_shape
    if y.shape != (n,):
        raise ValueError(f"y_true must hold {n} class indices, got shape {list(y.shape)}")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool) or not np.array_equal(y, np.round(y)):
        raise ValueError("y_true must hold integer class indices")
    if y.min() < 0 or y.max() >= n_labels:
        raise ValueError(f"y_true class indices must lie in [0, {n_labels - 1}]")
    return y.astype(int)


def _check_multilabel_targets(y_true: np.ndarray, probs_shape: tuple[int, ...]) -> np.ndarray:
    y = np.asarray(y_true, dtype=np.float64)
    if y.shape != probs_shape:
        raise ValueError(f"multilabel y_true must have shape {list(probs_shape)}, got {list(y.shape)}")
    if not (np.isnan(y) | (y == 0) | (y == 1)).all():
        raise ValueError("multilabel y_true must hold 0, 1 or NaN (unknown)")
    return y
