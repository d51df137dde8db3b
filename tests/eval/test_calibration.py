"""Tests for cxrkit.eval.calibration: hand-computed ECE, temperature recovery on synthetic data, NaN masking."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit, softmax

from cxrkit.eval.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
)

pytestmark = pytest.mark.filterwarnings("error")

TRUE_T = 3.0


def _binary_probs(p_positive: list[float] | np.ndarray) -> np.ndarray:
    p = np.asarray(p_positive, dtype=np.float64)
    return np.stack([1 - p, p], axis=1)


def _synthetic(task: str, n: int, sharpen: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets drawn from true probabilities; predictions are the true logits multiplied by ``sharpen``.

    ``sharpen = 1`` gives perfectly calibrated predictions; ``sharpen = 3`` over-confident ones that temperature
    scaling with T = 3 undoes exactly.
    """
    rng = np.random.default_rng(seed)
    if task == "multilabel":
        logits = rng.normal(0.0, 1.5, size=(n, 4))
        y = (rng.random((n, 4)) < expit(logits)).astype(np.float64)
        y[rng.random((n, 4)) < 0.2] = np.nan
        return y, expit(sharpen * logits)
    k = 2 if task == "binary" else 3
    logits = rng.normal(0.0, 1.5, size=(n, k))
    true = softmax(logits, axis=1)
    y = (rng.random((n, 1)) > np.cumsum(true, axis=1)).sum(axis=1)
    return y, softmax(sharpen * logits, axis=1)


def _nll(task: str, y: np.ndarray, probs: np.ndarray) -> float:
    if task == "multilabel":
        known = ~np.isnan(y)
        p, t = probs[known], y[known]
        return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))
    return float(-np.mean(np.log(probs[np.arange(len(y)), y])))


# --- expected calibration error -----------------------------------------------------------------------------------


def test_ece_hand_computed_multiclass() -> None:
    # 10 samples at confidence 0.95 (8 correct) and 10 at 0.65 (5 correct): 0.5 * 0.15 + 0.5 * 0.15.
    high = np.tile([0.95, 0.03, 0.02], (10, 1))
    low = np.tile([0.65, 0.25, 0.10], (10, 1))
    y = np.array([0] * 8 + [1] * 2 + [0] * 5 + [2] * 5)
    assert expected_calibration_error("multiclass", y, np.vstack([high, low])) == pytest.approx(0.15)


def test_ece_hand_computed_binary_uses_top_label() -> None:
    # Confidences 0.8, 0.8 (predicted positive; 1 of 2 correct) and 0.7, 0.7 (predicted negative; both correct).
    probs = _binary_probs([0.8, 0.8, 0.3, 0.3])
    y = np.array([1, 0, 0, 0])
    assert expected_calibration_error("binary", y, probs) == pytest.approx(0.5 * 0.3 + 0.5 * 0.3)


def test_ece_single_bin_is_confidence_minus_accuracy() -> None:
    probs = np.tile([0.9, 0.1], (4, 1))
    assert expected_calibration_error("binary", np.array([0, 0, 1, 1]), probs, n_bins=1) == pytest.approx(0.4)


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_ece_near_zero_when_calibrated(task: str) -> None:
    y, probs = _synthetic(task, 20000, sharpen=1.0, seed=1)
    assert expected_calibration_error(task, y, probs) < 0.03


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_ece_large_when_over_confident(task: str) -> None:
    y, probs = _synthetic(task, 5000, sharpen=TRUE_T, seed=1)
    assert expected_calibration_error(task, y, probs) > 0.05


def test_multilabel_ece_is_mean_of_binary_ece_on_known_entries() -> None:
    y, probs = _synthetic("multilabel", 2000, sharpen=2.0, seed=2)
    probs[np.isnan(y)] = 0.999  # whatever is predicted for unknown entries must not matter
    expected = [
        expected_calibration_error(
            "binary", y[~np.isnan(y[:, j]), j].astype(int), _binary_probs(probs[~np.isnan(y[:, j]), j])
        )
        for j in range(y.shape[1])
    ]
    assert expected_calibration_error("multilabel", y, probs) == pytest.approx(np.mean(expected))


def test_multilabel_ece_skips_unknown_labels_and_is_none_without_targets() -> None:
    y = np.array([[1.0, np.nan], [0.0, np.nan]])
    probs = np.array([[0.9, 0.5], [0.2, 0.7]])
    # Label 0 only: confidences 0.9 and 0.8, both correct.
    assert expected_calibration_error("multilabel", y, probs) == pytest.approx(0.15)
    assert expected_calibration_error("multilabel", np.full((2, 2), np.nan), probs) is None


def test_ece_rejects_bad_inputs() -> None:
    probs = _binary_probs([0.2, 0.7])
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error("binary", np.array([0, 1]), probs, n_bins=0)
    with pytest.raises(ValueError, match="2 columns"):
        expected_calibration_error("binary", np.array([0, 1]), np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="task"):
        expected_calibration_error("regression", np.array([0, 1]), probs)


# --- reliability curve --------------------------------------------------------------------------------------------


def test_reliability_curve_binary_bins_positive_probability() -> None:
    probs = _binary_probs([0.05, 0.15, 0.15, 0.85, 0.85, 0.85, 0.85])
    y = np.array([0, 0, 1, 1, 1, 1, 0])
    curve = reliability_curve("binary", y, probs, n_bins=10)
    assert curve["kind"] == "positive"
    assert curve["edges"] == pytest.approx(np.linspace(0, 1, 11).tolist())
    assert curve["count"] == [1, 2, 0, 0, 0, 0, 0, 0, 4, 0]
    assert curve["confidence"][1] == pytest.approx(0.15) and curve["accuracy"][1] == pytest.approx(0.5)
    assert curve["confidence"][8] == pytest.approx(0.85) and curve["accuracy"][8] == pytest.approx(0.75)
    assert curve["accuracy"][0] == 0.0 and curve["confidence"][2] is None and curve["accuracy"][2] is None
    assert json.loads(json.dumps(curve, allow_nan=False)) == curve


def test_reliability_curve_multiclass_is_top_label() -> None:
    y, probs = _synthetic("multiclass", 500, sharpen=1.0, seed=3)
    curve = reliability_curve("multiclass", y, probs)
    assert curve["kind"] == "top-label"
    assert len(curve["count"]) == len(curve["confidence"]) == len(curve["accuracy"]) == len(curve["edges"]) - 1 == 15
    assert sum(curve["count"]) == 500
    assert all(c is None or c >= 1 / 3 for c in curve["confidence"])
    # The count-weighted gap of the curve is the ECE.
    gaps = [n * abs(a - c) for n, a, c in zip(curve["count"], curve["accuracy"], curve["confidence"]) if n]
    assert sum(gaps) / 500 == pytest.approx(expected_calibration_error("multiclass", y, probs))


def test_reliability_curve_multilabel_pools_known_entries() -> None:
    y, probs = _synthetic("multilabel", 300, sharpen=1.0, seed=4)
    curve = reliability_curve("multilabel", y, probs, n_bins=5)
    assert curve["kind"] == "positive"
    assert sum(curve["count"]) == int((~np.isnan(y)).sum())
    known = ~np.isnan(y)
    in_top_bin = probs[known] > 0.8
    assert curve["accuracy"][-1] == pytest.approx(y[known][in_top_bin].mean())


# --- temperature scaling ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_fit_temperature_recovers_sharpening_and_improves_held_out(task: str) -> None:
    y_val, p_val = _synthetic(task, 4000, sharpen=TRUE_T, seed=10)
    y_test, p_test = _synthetic(task, 4000, sharpen=TRUE_T, seed=11)
    temperature = fit_temperature(task, y_val, p_val)
    assert temperature == pytest.approx(TRUE_T, rel=0.10)
    scaled = apply_temperature(task, p_test, temperature)
    assert _nll(task, y_test, scaled) < _nll(task, y_test, p_test)
    assert expected_calibration_error(task, y_test, scaled) < expected_calibration_error(task, y_test, p_test)


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_fit_temperature_is_one_when_calibrated(task: str) -> None:
    y, probs = _synthetic(task, 4000, sharpen=1.0, seed=12)
    assert fit_temperature(task, y, probs) == pytest.approx(1.0, abs=0.15)


def test_fit_temperature_detects_under_confidence() -> None:
    y, probs = _synthetic("multiclass", 4000, sharpen=0.5, seed=13)
    assert fit_temperature("multiclass", y, probs) == pytest.approx(0.5, rel=0.10)


def test_fit_temperature_masks_unknown_multilabel_targets() -> None:
    y, probs = _synthetic("multilabel", 2000, sharpen=TRUE_T, seed=14)
    known = ~np.isnan(y)
    probs[~known] = 1.0  # maximally wrong-looking values where the target is unknown must be ignored
    # One shared T minimises the mean NLL over known entries, so pooling them into one label gives the same fit.
    pooled = fit_temperature("multilabel", y[known][:, None], probs[known][:, None])
    assert fit_temperature("multilabel", y, probs) == pytest.approx(pooled, rel=1e-4)
    with pytest.raises(ValueError, match="unknown"):
        fit_temperature("multilabel", np.full_like(y, np.nan), probs)


def test_fit_temperature_stays_in_bounds_and_checks_them() -> None:
    y, probs = _synthetic("binary", 1000, sharpen=TRUE_T, seed=15)
    assert 1.0 <= fit_temperature("binary", y, probs, bounds=(1.0, 2.0)) <= 2.0
    assert fit_temperature("binary", y, probs, bounds=(1.0, 2.0)) == pytest.approx(2.0, abs=1e-3)
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature("binary", y, probs, bounds=(0.0, 2.0))


def test_fit_temperature_handles_hard_zero_and_one_probabilities() -> None:
    probs = _binary_probs([0.0, 1.0, 1.0, 0.0, 0.6])
    temperature = fit_temperature("binary", np.array([0, 1, 0, 1, 1]), probs)
    assert np.isfinite(temperature) and temperature > 1.0


# --- apply_temperature --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 2.5])
def test_apply_temperature_softmax_keeps_argmax_and_sums_to_one(temperature: float) -> None:
    _, probs = _synthetic("multiclass", 200, sharpen=1.0, seed=20)
    scaled = apply_temperature("multiclass", probs, temperature)
    assert scaled.shape == probs.shape
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(scaled.argmax(axis=1), probs.argmax(axis=1))
    # T > 1 softens (lower top-label confidence), T < 1 sharpens.
    assert (np.sign(probs.max(axis=1) - scaled.max(axis=1)) == np.sign(temperature - 1.0)).all()


def test_apply_temperature_matches_scaled_logits() -> None:
    logits = np.random.default_rng(21).normal(size=(50, 3))
    np.testing.assert_allclose(
        apply_temperature("multiclass", softmax(logits, axis=1), 2.0), softmax(logits / 2.0, axis=1)
    )
    np.testing.assert_allclose(apply_temperature("multilabel", expit(logits), 2.0), expit(logits / 2.0))


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_apply_temperature_one_is_identity(task: str) -> None:
    _, probs = _synthetic(task, 100, sharpen=1.0, seed=22)
    # Unchanged up to the exact row renormalisation of the input check (an ulp).
    np.testing.assert_allclose(apply_temperature(task, probs, 1.0), probs, rtol=0, atol=1e-15)


def test_apply_temperature_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature("binary", _binary_probs([0.3]), 0.0)


def test_a_temperature_at_its_upper_bound_names_both_causes():
    """A model confidently wrong on 4 of 10 images (not chance: right on the 6 others) also drives the temperature
    to its upper bound; the note said only that the model did no better than chance."""
    from cxrkit.eval.calibrate import calibration_notes
    from cxrkit.eval.calibration import TEMPERATURE_BOUNDS

    y = np.array([0] * 5 + [1] * 5)
    right = np.array([True] * 3 + [False] * 2 + [True] * 3 + [False] * 2)
    p_positive = np.where(right == (y == 1), expit(30.0), expit(-30.0))
    temperature = fit_temperature("binary", y, _binary_probs(p_positive))
    assert temperature == pytest.approx(TEMPERATURE_BOUNDS[1], rel=1e-3)
    notes = calibration_notes({"temperature": temperature, "calibration_images": 10})
    assert len(notes) == 1 and f"upper bound {TEMPERATURE_BOUNDS[1]:g}: on the 10 validation images" in notes[0]
    assert "no better than chance, or it is confidently wrong on some images" in notes[0]
