"""Tests for cxrkit.eval.metrics: hand-checkable cases, agreement with scikit-learn, undefined values."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from cxrkit.errors import CxrError
from cxrkit.eval.metrics import choose_threshold, compute_metrics, format_metrics_table

# Undefined metrics must come back as None, never as a warning.
pytestmark = pytest.mark.filterwarnings("error")

BINARY = ["normal", "pneumonia"]
THREE = ["normal", "bacterial", "viral"]
COMMON_KEYS = {
    "task",
    "labels",
    "n",
    "threshold",
    "accuracy",
    "auc",
    "auc_per_label",
    "average_precision",
    "average_precision_per_label",
    "f1_macro",
    "f1_weighted",
    "precision_macro",
    "recall_macro",
    "log_loss",
    "confusion_matrix",
    "confusion_matrix_normalized",
    "per_class",
    "output_distribution",
}


def _binary_probs(p_positive: list[float] | np.ndarray) -> np.ndarray:
    p = np.asarray(p_positive, dtype=np.float64)
    return np.stack([1 - p, p], axis=1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _round_trips(metrics: dict) -> None:
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics


# --- binary -------------------------------------------------------------------------------------------------------


def test_binary_perfectly_separated() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    m = compute_metrics("binary", BINARY, y, _binary_probs([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]))
    assert set(m) >= COMMON_KEYS | {"positive", "sensitivity", "specificity", "ppv", "npv"}
    assert m["task"] == "binary" and m["labels"] == BINARY and m["n"] == 6 and m["threshold"] == 0.5
    assert m["positive"] == "pneumonia"
    assert m["auc"] == 1.0 and m["auc_per_label"] == {"pneumonia": 1.0}
    assert m["average_precision"] == 1.0 and m["average_precision_per_label"] == {"pneumonia": 1.0}
    assert m["accuracy"] == 1.0 and m["f1_macro"] == 1.0
    assert (m["sensitivity"], m["specificity"], m["ppv"], m["npv"]) == (1.0, 1.0, 1.0, 1.0)
    assert m["confusion_matrix"] == [[3, 0], [0, 3]]
    _round_trips(m)


def test_binary_rates_at_a_given_threshold() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    m = compute_metrics("binary", BINARY, y, _binary_probs([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), threshold=0.75)
    # Predicted positive: 0.8 and 0.9 only -> tp 2, fn 1, tn 3, fp 0.
    assert m["confusion_matrix"] == [[3, 0], [1, 2]]
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == 1.0
    assert m["ppv"] == 1.0
    assert m["npv"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["threshold"] == 0.75
    assert m["output_distribution"] == pytest.approx({"normal": 4 / 6, "pneumonia": 2 / 6})
    assert m["per_class"]["pneumonia"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    np.testing.assert_allclose(m["confusion_matrix_normalized"], [[1.0, 0.0], [1 / 3, 2 / 3]])


def test_binary_threshold_is_inclusive() -> None:
    m = compute_metrics("binary", BINARY, np.array([0, 1]), _binary_probs([0.25, 0.5]))
    assert m["confusion_matrix"] == [[1, 0], [0, 1]]


def test_binary_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 200), 0, 1)
    m = compute_metrics("binary", BINARY, y, _binary_probs(p), threshold=0.4)
    pred = (p >= 0.4).astype(int)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["average_precision"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, _binary_probs(p)))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()


def test_binary_single_class_gives_none_not_errors() -> None:
    y = np.zeros(4, dtype=int)
    m = compute_metrics("binary", BINARY, y, _binary_probs([0.1, 0.2, 0.6, 0.7]))
    assert m["auc"] is None and m["auc_per_label"] == {"pneumonia": None}
    assert m["average_precision"] is None
    assert m["sensitivity"] is None  # no positives
    assert m["specificity"] == 0.5
    assert m["ppv"] == 0.0
    assert m["per_class"]["pneumonia"]["support"] == 0
    _round_trips(m)


def test_binary_no_predicted_positive_gives_ppv_none() -> None:
    m = compute_metrics("binary", BINARY, np.array([0, 1, 1]), _binary_probs([0.1, 0.2, 0.3]))
    assert m["ppv"] is None and m["sensitivity"] == 0.0 and m["auc"] == 1.0
    _round_trips(m)


# --- multiclass ---------------------------------------------------------------------------------------------------


def test_multiclass_known_confusion_matrix() -> None:
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0])
    probs = np.full((9, 3), 0.1)
    probs[np.arange(9), pred] = 0.8
    m = compute_metrics("multiclass", THREE, y, probs)
    assert m["threshold"] is None
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    normalized = np.array(m["confusion_matrix_normalized"])
    np.testing.assert_allclose(normalized, [[2 / 3, 1 / 3, 0], [0, 0.5, 0.5], [0.25, 0, 0.75]])
    np.testing.assert_allclose(normalized.sum(axis=1), 1.0)
    assert [m["per_class"][n]["recall"] for n in THREE] == pytest.approx([2 / 3, 1 / 2, 3 / 4])
    assert [m["per_class"][n]["support"] for n in THREE] == [3, 2, 4]
    assert m["accuracy"] == pytest.approx(6 / 9)
    assert m["recall_macro"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert m["output_distribution"] == pytest.approx({"normal": 3 / 9, "bacterial": 2 / 9, "viral": 4 / 9})
    assert set(m["auc_per_label"]) == set(THREE)
    _round_trips(m)


def test_multiclass_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    probs = _softmax(rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[y])
    m = compute_metrics("multiclass", THREE, y, probs)
    pred = probs.argmax(axis=1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    for c, name in enumerate(THREE):
        assert m["auc_per_label"][name] == pytest.approx(skm.roc_auc_score(y == c, probs[:, c]))
        assert m["average_precision_per_label"][name] == pytest.approx(skm.average_precision_score(y == c, probs[:, c]))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, probs))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["precision_macro"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()


def test_multiclass_absent_class_is_none_and_left_out_of_the_mean() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.4, 0.3]])
    m = compute_metrics("multiclass", THREE, y, probs)
    assert m["auc_per_label"]["viral"] is None
    assert m["average_precision_per_label"]["viral"] is None
    assert m["auc"] == pytest.approx(np.mean([m["auc_per_label"]["normal"], m["auc_per_label"]["bacterial"]]))
    assert m["per_class"]["viral"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["confusion_matrix_normalized"][2] == [0.0, 0.0, 0.0]
    # every image right: the macro averages run over the classes that occur (they used to count viral as 0)
    assert m["f1_macro"] == m["precision_macro"] == m["recall_macro"] == 1.0
    _round_trips(m)
    # a class absent from the targets but predicted does occur: its false positives count, as F1 0
    probs[0] = [0.1, 0.1, 0.8]
    m = compute_metrics("multiclass", THREE, y, probs)
    pred = probs.argmax(axis=1)
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro")) and m["f1_macro"] < 0.75


# --- multilabel ---------------------------------------------------------------------------------------------------


def _multilabel_data(seed: int, unknown_share: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (120, 4)).astype(np.float64)
    probs = np.clip(0.35 * y + rng.uniform(0, 0.65, y.shape), 0, 1)
    y[rng.uniform(size=y.shape) < unknown_share] = np.nan
    return y, probs


LABELS4 = ["atelectasis", "effusion", "nodule", "pneumothorax"]


def test_multilabel_nan_entries_are_masked_per_label() -> None:
    y, probs = _multilabel_data(2, unknown_share=0.3)
    m = compute_metrics("multilabel", LABELS4, y, probs, threshold=0.45)
    assert set(m) >= COMMON_KEYS | {"subset_accuracy"}
    pred = (probs >= 0.45).astype(int)
    accuracies = []
    for j, name in enumerate(LABELS4):
        known = ~np.isnan(y[:, j])
        yk, pk, dk = y[known, j].astype(int), probs[known, j], pred[known, j]
        assert m["auc_per_label"][name] == pytest.approx(skm.roc_auc_score(yk, pk))
        assert m["average_precision_per_label"][name] == pytest.approx(skm.average_precision_score(yk, pk))
        assert m["per_class"][name]["recall"] == pytest.approx(skm.recall_score(yk, dk))
        assert m["per_class"][name]["precision"] == pytest.approx(skm.precision_score(yk, dk))
        assert m["per_class"][name]["support"] == int(yk.sum())
        assert m["per_class"][name]["n_known"] == int(known.sum())
        assert m["confusion_matrix"][name] == skm.confusion_matrix(yk, dk).tolist()
        accuracies.append(skm.accuracy_score(yk, dk))
    assert m["accuracy"] == pytest.approx(np.mean(accuracies))
    assert m["auc"] == pytest.approx(np.mean(list(m["auc_per_label"].values())))
    complete = ~np.isnan(y).any(axis=1)
    assert m["subset_accuracy"] == pytest.approx(skm.accuracy_score(y[complete], pred[complete]))
    known = ~np.isnan(y)
    assert m["log_loss"] == pytest.approx(skm.log_loss(y[known], probs[known]))
    assert m["output_distribution"] == pytest.approx(dict(zip(LABELS4, pred.mean(axis=0), strict=True)))
    _round_trips(m)


def test_multilabel_without_unknowns_matches_sklearn_averages() -> None:
    y, probs = _multilabel_data(3, unknown_share=0.0)
    m = compute_metrics("multilabel", LABELS4, y, probs)
    pred = (probs >= 0.5).astype(int)
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted", zero_division=0))
    assert m["precision_macro"] == pytest.approx(skm.precision_score(y, pred, average="macro", zero_division=0))
    assert m["recall_macro"] == pytest.approx(skm.recall_score(y, pred, average="macro", zero_division=0))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, average="macro"))
    assert m["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    expected = skm.multilabel_confusion_matrix(y, pred)
    assert [m["confusion_matrix"][name] for name in LABELS4] == expected.tolist()


def test_multilabel_undefined_labels_are_none() -> None:
    y = np.array([[0.0, np.nan, 1.0], [0.0, np.nan, np.nan], [0.0, np.nan, 0.0]])
    probs = np.array([[0.2, 0.9, 0.8], [0.7, 0.1, 0.4], [0.1, 0.5, 0.3]])
    m = compute_metrics("multilabel", ["a", "b", "c"], y, probs)
    assert m["auc_per_label"] == {"a": None, "b": None, "c": 1.0}  # a: only negatives; b: all unknown
    assert m["auc"] == 1.0
    assert m["per_class"]["b"] == {"precision": None, "recall": None, "f1": None, "support": 0, "n_known": 0}
    assert m["confusion_matrix"]["b"] == [[0, 0], [0, 0]]
    assert m["subset_accuracy"] is None  # every row has an unknown
    _round_trips(m)


def test_a_label_without_positives_has_no_recall_and_is_left_out_of_the_macro_means() -> None:
    """A finding absent from a split read recall 0 and F1 0 and pulled f1_macro down."""
    y = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    probs = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.9], [0.8, 0.2, 0.1], [0.1, 0.6, 0.3]])
    m = compute_metrics("multilabel", ["a", "never", "c"], y, probs)
    assert m["per_class"]["never"]["recall"] is None  # no positive: undefined, not 0
    assert m["per_class"]["never"]["precision"] == 0.0 and m["per_class"]["never"]["f1"] == 0.0  # one false alarm
    assert m["f1_macro"] == pytest.approx(2 / 3) and m["recall_macro"] == pytest.approx(1.0)
    quiet = compute_metrics("multilabel", ["a", "never", "c"], y, np.where(np.arange(3) == 1, 0.1, probs))
    assert quiet["per_class"]["never"] == {"precision": None, "recall": None, "f1": None, "support": 0, "n_known": 4}
    assert quiet["f1_macro"] == pytest.approx(1.0) and quiet["recall_macro"] == pytest.approx(1.0)
    _round_trips(quiet)


def test_multilabel_all_unknown_does_not_crash() -> None:
    m = compute_metrics("multilabel", ["a", "b"], np.full((3, 2), np.nan), np.full((3, 2), 0.5))
    assert m["accuracy"] is None and m["auc"] is None and m["log_loss"] is None and m["f1_weighted"] is None
    _round_trips(m)


# --- JSON and validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "labels", "y", "probs"),
    [
        ("binary", BINARY, np.array([1, 1]), np.array([[0.4, 0.6], [0.9, 0.1]], dtype=np.float32)),
        ("multiclass", THREE, np.array([2, 2]), np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])),
        ("multilabel", ["a"], np.array([[np.nan], [1.0]]), np.array([[0.3], [0.6]], dtype=np.float32)),
    ],
)
def test_degenerate_inputs_round_trip_through_strict_json(task, labels, y, probs) -> None:
    m = compute_metrics(task, labels, y, probs)
    _round_trips(m)
    assert all(isinstance(v, (str, int, float, list, dict, type(None))) for v in m.values())


@pytest.mark.parametrize(
    ("task", "labels", "y", "probs", "threshold"),
    [
        ("survival", BINARY, np.array([0]), np.array([[0.5, 0.5]]), None),
        ("binary", THREE, np.array([0]), np.array([[0.2, 0.3, 0.5]]), None),
        ("binary", BINARY, np.array([0, 1]), np.array([[0.5, 0.5]]), None),
        ("binary", BINARY, np.array([0, 2]), _binary_probs([0.1, 0.2]), None),
        ("binary", BINARY, np.array([0, 1]), _binary_probs([0.1, 0.2]), 1.5),
        ("binary", BINARY, np.array([0, 1]), np.array([[0.9, 0.9], [0.1, 0.1]]), None),
        ("multiclass", THREE, np.array([0]), np.array([[0.2, 0.3, 0.5]]), 0.5),
        ("multiclass", ["a", "a", "b"], np.array([0]), np.array([[0.2, 0.3, 0.5]]), None),
        ("multilabel", ["a"], np.array([[2.0]]), np.array([[0.5]]), None),
        ("multilabel", ["a"], np.array([[1.0]]), np.array([[1.5]]), None),
    ],
)
def test_inconsistent_inputs_raise_value_error(task, labels, y, probs, threshold) -> None:
    with pytest.raises(ValueError):
        compute_metrics(task, labels, y, probs, threshold)


def test_import_does_not_pull_torch() -> None:
    code = "import sys, cxrkit.eval.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- thresholds ---------------------------------------------------------------------------------------------------


def test_youden_threshold_lies_between_the_clusters() -> None:
    rng = np.random.default_rng(4)
    negatives, positives = rng.uniform(0.05, 0.3, 50), rng.uniform(0.6, 0.95, 40)
    y = np.r_[np.zeros(50, dtype=int), np.ones(40, dtype=int)]
    threshold = choose_threshold(y, np.r_[negatives, positives])
    assert negatives.max() < threshold <= positives.min()
    m = compute_metrics("binary", BINARY, y, _binary_probs(np.r_[negatives, positives]), threshold=threshold)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def test_youden_maximises_j() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.25 * y + rng.uniform(0, 0.75, 400), 0, 1)
    threshold = choose_threshold(y, p, method="youden")
    fpr, tpr, _ = skm.roc_curve(y, p)
    pred = p >= threshold
    j = skm.recall_score(y, pred) + skm.recall_score(y, pred, pos_label=0) - 1
    assert j == pytest.approx(np.max(tpr - fpr))


def test_target_sensitivity_is_reached_by_the_highest_such_threshold() -> None:
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 500), 0, 1)
    threshold = choose_threshold(y, p, target_sensitivity=0.95)
    assert skm.recall_score(y, p >= threshold) >= 0.95
    higher = p[p > threshold].min()  # the next candidate up misses the target
    assert skm.recall_score(y, p >= higher) < 0.95
    m = compute_metrics("binary", BINARY, y, _binary_probs(p), threshold=threshold)
    assert m["sensitivity"] >= 0.95


def test_target_sensitivity_one_keeps_every_positive() -> None:
    y = np.array([0, 1, 0, 1, 0])
    p = np.array([0.1, 0.2, 0.3, 0.9, 0.8])
    assert choose_threshold(y, p, target_sensitivity=1.0) == 0.2


def test_choose_threshold_errors() -> None:
    y, p = np.array([0, 1]), np.array([0.2, 0.8])
    with pytest.raises(CxrError, match="only class"):
        choose_threshold(np.array([1, 1]), p)
    with pytest.raises(ValueError):
        choose_threshold(y, p, method="f1")
    with pytest.raises(ValueError):
        choose_threshold(y, p, method="sensitivity")
    with pytest.raises(ValueError):
        choose_threshold(y, p, target_sensitivity=1.5)
    with pytest.raises(ValueError):
        choose_threshold(y, np.array([0.1, 0.2, 0.3]))


# --- table --------------------------------------------------------------------------------------------------------


def test_format_metrics_table_binary() -> None:
    y = np.array([0, 0, 1, 1])
    m = compute_metrics("binary", BINARY, y, _binary_probs([0.1, 0.6, 0.7, 0.9]), threshold=0.65)
    rows = dict(format_metrics_table(json.loads(json.dumps(m))))
    assert rows["samples"] == "4"
    assert rows["accuracy"] == "1.0000"
    assert rows["AUC"] == "1.0000"
    assert rows["threshold"] == "0.6500"
    assert {"F1 macro", "sensitivity", "specificity", "recall normal", "recall pneumonia"} <= set(rows)
    assert all(isinstance(name, str) and isinstance(value, str) for name, value in rows.items())


def test_format_metrics_table_shows_undefined_as_na() -> None:
    y = np.array([[0.0, np.nan], [0.0, np.nan]])
    m = compute_metrics("multilabel", ["a", "b"], y, np.array([[0.1, 0.2], [0.3, 0.4]]))
    rows = dict(format_metrics_table(m))
    assert rows["AUC"] == "n/a" and rows["recall b"] == "n/a" and rows["subset accuracy"] == "n/a"
    assert "sensitivity" not in rows
