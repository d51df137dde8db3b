"""Tests for cxrkit.eval.bootstrap: agreement with compute_metrics, determinism, width, patient resampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit, softmax

from cxrkit.eval.bootstrap import METRICS, _scorers, bootstrap_ci
from cxrkit.eval.metrics import _check_probs, compute_metrics

pytestmark = pytest.mark.filterwarnings("error")

LABELS = {"binary": ["normal", "pneumonia"], "multiclass": ["normal", "bacterial", "viral"]}
LABELS["multilabel"] = ["effusion", "nodule", "mass", "edema"]
TASKS = ["binary", "multiclass", "multilabel"]


def _data(task: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Informative but imperfect predictions, with ties in the scores (rounded) and NaN targets for multilabel."""
    rng = np.random.default_rng(seed)
    k = len(LABELS[task])
    if task == "multilabel":
        y = (rng.random((n, k)) < 0.3).astype(np.float64)
        probs = np.round(expit(1.5 * y - 0.8 + rng.normal(size=(n, k))), 2)
        y[rng.random((n, k)) < 0.15] = np.nan
        return y, probs
    y = rng.integers(0, k, n)
    logits = 1.2 * np.eye(k)[y] + rng.normal(size=(n, k))
    probs = np.round(softmax(logits, axis=1), 2)
    return y, probs / probs.sum(axis=1, keepdims=True)


def _width(interval: list[float]) -> float:
    return interval[1] - interval[0]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("repeat", [False, True])
def test_resample_metrics_agree_with_compute_metrics(task: str, repeat: bool) -> None:
    # Scoring weights w is scoring the data with each image repeated w times; unit weights are the full sample.
    y, probs = _data(task, 300, seed=1)
    weights = np.random.default_rng(2).integers(0, 4, len(y)) if repeat else np.ones(len(y), dtype=int)
    expected = compute_metrics(task, LABELS[task], np.repeat(y, weights, axis=0), np.repeat(probs, weights, axis=0))
    wanted = [m for m in METRICS if task == "binary" or m in ("accuracy", "auc")]
    threshold = None if task == "multiclass" else 0.5
    # bootstrap_ci scores the probabilities as validated (softmax rows renormalised); an ulp can break a tie.
    scorers = _scorers(task, y, _check_probs(task, probs, probs.shape[1]), threshold, wanted)
    for name, score in scorers.items():
        assert score(weights[None, :].astype(np.float64))[0] == pytest.approx(expected[name], abs=1e-12), name


@pytest.mark.parametrize("task", TASKS)
def test_interval_contains_point_estimate_and_is_json(task: str) -> None:
    y, probs = _data(task, 400)
    result = bootstrap_ci(task, LABELS[task], y, probs, n_boot=500)
    point = compute_metrics(task, LABELS[task], y, probs)
    expected_metrics = list(METRICS) if task == "binary" else ["accuracy", "auc"]
    assert list(result) == [*expected_metrics, "method"]
    for name in expected_metrics:
        low, high = result[name]
        assert low < point[name] < high, name
        assert _width(result[name]) < 0.2
    assert result["method"] == {
        "interval": "percentile",
        "resampled": "images",
        "n_units": 400,
        "n_boot": 500,
        "n_valid": dict.fromkeys(expected_metrics, 500),
        "level": 0.95,
        "seed": 0,
        "threshold": None if task == "multiclass" else 0.5,
    }
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_same_seed_same_result_other_seed_close() -> None:
    y, probs = _data("binary", 300)
    first = bootstrap_ci("binary", LABELS["binary"], y, probs, n_boot=400, seed=7)
    assert bootstrap_ci("binary", LABELS["binary"], y, probs, n_boot=400, seed=7) == first
    other = bootstrap_ci("binary", LABELS["binary"], y, probs, n_boot=400, seed=8)
    assert other != first
    for name in METRICS:
        assert other[name] == pytest.approx(first[name], abs=0.04)


def test_larger_sample_gives_narrower_interval() -> None:
    small_y, small_p = _data("binary", 200, seed=3)
    large_y, large_p = _data("binary", 2000, seed=3)
    small = bootstrap_ci("binary", LABELS["binary"], small_y, small_p, n_boot=400)
    large = bootstrap_ci("binary", LABELS["binary"], large_y, large_p, n_boot=400)
    for name in METRICS:
        assert _width(large[name]) < 0.6 * _width(small[name]), name


@pytest.mark.parametrize("task", TASKS)
def test_patient_resampling_is_wider_for_correlated_images(task: str) -> None:
    # 80 patients with 5 identical images each: the effective sample size is 80 patients, not 400 images.
    y_patients, p_patients = _data(task, 80, seed=4)
    y, probs = np.repeat(y_patients, 5, axis=0), np.repeat(p_patients, 5, axis=0)
    patients = np.repeat([f"patient{i:03d}" for i in range(80)], 5)
    by_image = bootstrap_ci(task, LABELS[task], y, probs, n_boot=500)
    by_patient = bootstrap_ci(task, LABELS[task], y, probs, groups=patients, n_boot=500)
    assert by_patient["method"]["resampled"] == "patients" and by_patient["method"]["n_units"] == 80
    for name in ("accuracy", "auc"):
        assert _width(by_patient[name]) > 1.5 * _width(by_image[name]), name


def test_patient_resampling_of_one_image_per_patient_is_image_resampling() -> None:
    y, probs = _data("binary", 200)
    groups = [f"p{i:04d}" for i in range(200)]  # sorted ids: unit i is image i, so the draws coincide
    by_patient = bootstrap_ci("binary", LABELS["binary"], y, probs, groups=groups, n_boot=200)
    by_image = bootstrap_ci("binary", LABELS["binary"], y, probs, n_boot=200)
    assert {k: v for k, v in by_patient.items() if k != "method"} == {
        k: v for k, v in by_image.items() if k != "method"
    }


def test_undefined_metrics_give_none() -> None:
    y = np.zeros(50, dtype=int)
    probs = np.stack([np.linspace(0.2, 0.9, 50), np.linspace(0.8, 0.1, 50)], axis=1)
    result = bootstrap_ci("binary", LABELS["binary"], y, probs, n_boot=200)
    assert result["auc"] is None and result["sensitivity"] is None
    assert result["accuracy"] is not None and result["specificity"] is not None
    assert result["method"]["n_valid"] == {"accuracy": 200, "auc": 0, "sensitivity": 0, "specificity": 200}


def test_resamples_without_a_rare_class_are_dropped() -> None:
    # One positive in 30 images: about (29/30)^30 = 36% of resamples miss it and have no AUC or sensitivity.
    y = np.zeros(30, dtype=int)
    y[0] = 1
    probs = np.stack([np.linspace(0.1, 0.9, 30), np.linspace(0.9, 0.1, 30)], axis=1)
    result = bootstrap_ci("binary", LABELS["binary"], y, probs, n_boot=500)
    n_valid = result["method"]["n_valid"]
    assert 250 < n_valid["auc"] < 450 and n_valid["sensitivity"] == n_valid["auc"]
    assert result["auc"] == [1.0, 1.0]  # the positive has the highest score in every resample that holds it


def test_multilabel_label_without_known_targets_is_skipped() -> None:
    y, probs = _data("multilabel", 200)
    y[:, 3] = np.nan
    result = bootstrap_ci("multilabel", LABELS["multilabel"], y, probs, n_boot=200)
    point = compute_metrics("multilabel", LABELS["multilabel"], y, probs)
    assert result["auc"][0] < point["auc"] < result["auc"][1]
    assert result["method"]["n_valid"]["auc"] == 200


def test_metric_selection_and_level() -> None:
    y, probs = _data("binary", 300)
    narrow = bootstrap_ci("binary", LABELS["binary"], y, probs, n_boot=300, level=0.5, metrics=["auc"])
    wide = bootstrap_ci("binary", LABELS["binary"], y, probs, n_boot=300, level=0.99, metrics="auc")
    assert list(narrow) == list(wide) == ["auc", "method"]
    assert _width(narrow["auc"]) < _width(wide["auc"])
    multiclass = bootstrap_ci(
        "multiclass", LABELS["multiclass"], *_data("multiclass", 100), n_boot=50, metrics=["sensitivity"]
    )
    assert list(multiclass) == ["method"]


def test_threshold_moves_sensitivity() -> None:
    y, probs = _data("binary", 300)
    low = bootstrap_ci("binary", LABELS["binary"], y, probs, threshold=0.2, n_boot=200, metrics=["sensitivity"])
    high = bootstrap_ci("binary", LABELS["binary"], y, probs, threshold=0.8, n_boot=200, metrics=["sensitivity"])
    assert low["sensitivity"][0] > high["sensitivity"][1]
    assert low["method"]["threshold"] == 0.2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"groups": ["a", "b"]}, "groups"),
        ({"metrics": ["auc", "f1"]}, "unknown metrics"),
        ({"level": 1.0}, "level"),
        ({"n_boot": 0}, "n_boot"),
        ({"threshold": 1.5}, "threshold"),
    ],
)
def test_rejects_bad_options(kwargs: dict, match: str) -> None:
    y, probs = _data("binary", 20)
    with pytest.raises(ValueError, match=match):
        bootstrap_ci("binary", LABELS["binary"], y, probs, **kwargs)


def test_rejects_threshold_for_multiclass() -> None:
    with pytest.raises(ValueError, match="threshold"):
        bootstrap_ci("multiclass", LABELS["multiclass"], *_data("multiclass", 20), threshold=0.5)
