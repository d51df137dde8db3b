"""Calibration of predicted probabilities: expected calibration error, reliability curves, temperature scaling.

Everything follows Guo et al. 2017, "On Calibration of Modern Neural Networks" (ICML): the expected calibration error
and reliability diagrams of their Sec. 2 and the temperature scaling of their Sec. 4.2. The conventions are those of
:func:`cxrkit.eval.metrics.compute_metrics`: binary / multiclass ``y_true`` are class indices ``[n]`` and ``probs``
softmax rows ``[n, k]`` (binary: column 1 is the positive class); multilabel ``y_true`` is ``[n, k]`` with 0, 1 or
NaN (unknown, left out everywhere) and ``probs`` are sigmoid outputs ``[n, k]``.

cxrkit stores probabilities, not logits, so temperature scaling works from them: a softmax row's log-probabilities
are its logits up to a per-row constant, which softmax ignores, so ``softmax(log p / T)`` is exactly
``softmax(z / T)``; a sigmoid output's logit is ``log(p / (1 - p))``. Probabilities are clipped to
``[1e-7, 1 - 1e-7]`` before taking logarithms.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import expit, log_softmax, logit, softmax

from cxrkit.eval.checks import TASKS, _check_class_targets, _check_multilabel_targets, _check_probs

DEFAULT_BINS = 15
PROB_CLIP = 1e-7
TEMPERATURE_BOUNDS = (0.05, 20.0)


def expected_calibration_error(
    task: str, y_true: np.ndarray, probs: np.ndarray, n_bins: int = DEFAULT_BINS
) -> float | None:
    """Expected calibration error with equal-width confidence bins (Guo et al. 2017, Sec. 2).

    ``ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|``, where bin ``B_m`` holds the samples whose confidence lies in
    ``((m - 1) / M, m / M]`` (the first bin also takes a confidence of exactly 0), ``conf(B_m)`` is their mean
    confidence, ``acc(B_m)`` the fraction of them predicted correctly, and empty bins contribute nothing.

    - binary and multiclass: the confidence is the top-label probability ``max_j probs[i, j]`` and a sample is
      correct when its most probable class (ties: the lowest index) is ``y_true[i]``. A binary task is thus scored as
      the two-class softmax it is, independent of any decision threshold.
    - multilabel: each label is scored as a binary task with probabilities ``[1 - p, p]`` on its known entries
      (top-label confidence ``max(p, 1 - p)``); the result is the unweighted mean over the labels that have at least
      one known entry.

    Args:
        task: ``binary``, ``multiclass`` or ``multilabel``.
        y_true: targets in the module's conventions.
        probs: predicted probabilities ``[n, k]``.
        n_bins: the number of equal-width bins ``M`` on ``[0, 1]``.

    Returns:
        The ECE in ``[0, 1]``, or None for a multilabel task without any known target.

    Raises:
        ValueError: on inconsistent inputs.
    """
    y, p = _check_inputs(task, y_true, probs)
    edges = _bin_edges(n_bins)
    if task != "multilabel":
        return _ece(*_top_label(y, p), edges)
    known = ~np.isnan(y)
    per_label = [
        _ece(*_top_label(y[known[:, j], j].astype(int), _two_columns(p[known[:, j], j])), edges)
        for j in range(p.shape[1])
        if known[:, j].any()
    ]
    return float(np.mean(per_label)) if per_label else None


def reliability_curve(task: str, y_true: np.ndarray, probs: np.ndarray, n_bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """The points of a reliability diagram (Guo et al. 2017, Sec. 2, Fig. 1 bottom).

    Samples are put into the same equal-width bins as :func:`expected_calibration_error`. What is binned depends on
    the task, and is named by ``kind``:

    - binary (``kind="positive"``): the positive-class probability ``probs[:, 1]`` against the observed frequency of
      the positive class.
    - multiclass (``kind="top-label"``): the top-label confidence against the fraction predicted correctly.
    - multilabel (``kind="positive"``): every known (image, label) entry pooled over labels, its probability against
      the observed frequency of 1.

    Args:
        task: ``binary``, ``multiclass`` or ``multilabel``.
        y_true: targets in the module's conventions.
        probs: predicted probabilities ``[n, k]``.
        n_bins: the number of equal-width bins on ``[0, 1]``.

    Returns:
        A JSON-serialisable dict: ``kind`` (``"positive"`` or ``"top-label"``), ``edges`` (``n_bins + 1`` floats from 0
        to 1), and per bin ``confidence`` (mean predicted probability), ``accuracy`` (observed frequency, or fraction
        correct for ``top-label``) and ``count``. ``confidence`` and ``accuracy`` are None for empty bins.

    Raises:
        ValueError: on inconsistent inputs.
    """
    y, p = _check_inputs(task, y_true, probs)
    edges = _bin_edges(n_bins)
    if task == "multiclass":
        kind, (confidence, outcome) = "top-label", _top_label(y, p)
    elif task == "binary":
        kind, confidence, outcome = "positive", p[:, 1], (y == 1).astype(np.float64)
    else:
        known = ~np.isnan(y)
        kind, confidence, outcome = "positive", p[known], y[known]
    counts, mean_confidence, mean_outcome = _bin_stats(confidence, outcome, edges)
    empty = counts == 0
    return {
        "kind": kind,
        "edges": [float(e) for e in edges],
        "confidence": [None if e else float(c) for c, e in zip(mean_confidence, empty, strict=True)],
        "accuracy": [None if e else float(a) for a, e in zip(mean_outcome, empty, strict=True)],
        "count": [int(c) for c in counts],
    }


def fit_temperature(
    task: str,
    y_true: np.ndarray,
    probs: np.ndarray,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """Fits the temperature of temperature scaling on a validation split (Guo et al. 2017, Sec. 4.2).

    Finds the single scalar ``T > 0`` minimising the mean negative log-likelihood of the rescaled predictions:
    softmax cross-entropy of ``softmax(z / T)`` for binary / multiclass, binary cross-entropy of ``sigmoid(z / T)``
    over the known entries for multilabel, where ``z`` are the logits recovered from ``probs`` (see the module
    docstring). ``log T`` is optimised with :func:`scipy.optimize.minimize_scalar` (``method="bounded"``), which
    makes the search symmetric between sharpening and softening. ``T > 1`` softens over-confident predictions.

    Args:
        task: ``binary``, ``multiclass`` or ``multilabel``.
        y_true: validation targets in the module's conventions.
        probs: validation probabilities ``[n, k]``.
        bounds: the search interval ``(T_min, T_max)``, with ``0 < T_min < T_max``.

    Returns:
        The fitted temperature, within ``bounds``.

    Raises:
        ValueError: on inconsistent inputs, invalid bounds, or a multilabel task without any known target.
    """
    low, high = (float(b) for b in bounds)
    if not 0.0 < low < high or not math.isfinite(high):
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds}")
    y, p = _check_inputs(task, y_true, probs)
    logits = _logits(task, p)
    if task == "multilabel":
        known = ~np.isnan(y)
        if not known.any():
            raise ValueError("cannot fit a temperature: every multilabel target is unknown (NaN)")
        z, sign = logits[known], 2.0 * y[known] - 1.0

        def nll(log_t: float) -> float:
            # -log sigmoid(s * x) = log(1 + exp(-s * x)) with s = +1 for positives and -1 for negatives.
            return float(np.mean(np.logaddexp(0.0, -sign * z / math.exp(log_t))))
    else:
        rows = np.arange(len(y))

        def nll(log_t: float) -> float:
            return float(-np.mean(log_softmax(logits / math.exp(log_t), axis=1)[rows, y]))

    from scipy.optimize import minimize_scalar  # here: applying a temperature does not need it

    result = minimize_scalar(nll, bounds=(math.log(low), math.log(high)), method="bounded", options={"xatol": 1e-5})
    return float(np.clip(math.exp(result.x), low, high))


def apply_temperature(task: str, probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rescales probabilities by a temperature (Guo et al. 2017, Sec. 4.2).

    Binary / multiclass: ``softmax(log p / T)``, rows summing to 1 with the argmax unchanged. Multilabel:
    ``sigmoid(logit(p) / T)`` entrywise. ``T = 1`` returns the probabilities unchanged.

    Args:
        task: ``binary``, ``multiclass`` or ``multilabel``.
        probs: probabilities ``[n, k]``.
        temperature: ``T > 0``, e.g. from :func:`fit_temperature`.

    Returns:
        The rescaled probabilities as a new float64 array ``[n, k]``.

    Raises:
        ValueError: on a non-positive temperature or invalid probabilities.
    """
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    p = _check_prob_matrix(task, probs)
    if temperature == 1.0:
        return p.copy()
    scaled = _logits(task, p) / temperature
    return expit(scaled) if task == "multilabel" else softmax(scaled, axis=1)


def _logits(task: str, p: np.ndarray) -> np.ndarray:
    """Logits up to a per-row constant (softmax) or exactly (sigmoid), from clipped probabilities."""
    clipped = np.clip(p, PROB_CLIP, 1.0 - PROB_CLIP)
    return logit(clipped) if task == "multilabel" else np.log(clipped)


def _top_label(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence and correctness (1.0 / 0.0) of softmax rows."""
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def _two_columns(p_positive: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - p_positive, p_positive], axis=1)


def _bin_edges(n_bins: int) -> np.ndarray:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return np.linspace(0.0, 1.0, int(n_bins) + 1)


def _bin_stats(
    confidence: np.ndarray, outcome: np.ndarray, edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin count, mean confidence and mean outcome; bins are ``(edges[m], edges[m + 1]]``, 0 goes to the first.

    Means of empty bins are 0 (their count says they are empty).
    """
    n_bins = len(edges) - 1
    index = np.searchsorted(edges[1:-1], confidence, side="left")
    counts = np.bincount(index, minlength=n_bins)
    safe = np.maximum(counts, 1)
    mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / safe
    mean_outcome = np.bincount(index, weights=outcome, minlength=n_bins) / safe
    return counts, mean_confidence, mean_outcome


def _ece(confidence: np.ndarray, correct: np.ndarray, edges: np.ndarray) -> float:
    counts, mean_confidence, mean_outcome = _bin_stats(confidence, correct, edges)
    return float(np.sum(counts * np.abs(mean_outcome - mean_confidence)) / counts.sum())


def _check_prob_matrix(task: str, probs: np.ndarray) -> np.ndarray:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    shape = np.shape(probs)
    if len(shape) != 2:
        raise ValueError(f"probs must have shape [n, n_labels], got {list(shape)}")
    if task == "binary" and shape[1] != 2:
        raise ValueError(f"binary probs must have 2 columns (softmax), got {shape[1]}")
    if task == "multiclass" and shape[1] < 2:
        raise ValueError(f"multiclass probs need at least 2 columns, got {shape[1]}")
    return _check_probs(task, probs, shape[1])


def _check_inputs(task: str, y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(targets, probabilities)``, with the checks of :mod:`cxrkit.eval.checks`."""
    p = _check_prob_matrix(task, probs)
    if task == "multilabel":
        return _check_multilabel_targets(y_true, p.shape), p
    return _check_class_targets(y_true, p.shape), p
