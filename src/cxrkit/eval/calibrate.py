"""Calibrate a run on its validation split, never on test: temperature scaling and the operating threshold.

The results go into the run's ``labels.json`` (``temperature``, ``threshold``, ``threshold_method``), which
``cxr evaluate``, ``cxr predict`` and the service read, so every consumer of the run uses the same calibrated
probabilities and the same decision rule.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from cxrkit.errors import CxrError
from cxrkit.runs import check_writable
from cxrkit.serve.predictor import Predictor


def calibrate_run(
    predictor: Predictor, method: str = "youden", target_sensitivity: float | None = None,
    temperature: bool = True, console: Any = None, strict_threshold: bool = True,
) -> dict[str, Any]:
    """Fit the temperature and choose the binary threshold on the run's validation split; update ``labels.json``.

    Args:
        predictor: the run, loaded.
        method: ``youden`` (maximise sensitivity + specificity - 1) or ``sensitivity`` (the highest threshold that
            reaches ``target_sensitivity``).
        target_sensitivity: e.g. 0.95; implies ``method="sensitivity"``.
        temperature: fit a temperature (else keep 1.0).
        console: a rich console for progress, or None.
        strict_threshold: raise when no threshold can be chosen; else keep 0.5 and say why in ``threshold_method``.

    Returns:
        The updated ``labels.json`` content.
    """
    info = {**predictor.labels_info,
            **fit_calibration(predictor, method, target_sensitivity, temperature, console, strict_threshold),
            "calibrated_checkpoint": predictor.checkpoint, "calibrated_weights_sha256": predictor.weights_sha256}
    predictor.run.write_json("labels.json", info)
    predictor.labels_info = info
    return info


def check_threshold_options(method: str, target_sensitivity: float | None,
                            names: tuple[str, str] = ("method", "target_sensitivity")) -> None:
    """Refuse a threshold method or target sensitivity that cannot be used, before any prediction; ``names`` are
    how the caller spells the two (``--method``, ``--target-sensitivity`` on the command line)."""
    if method not in ("youden", "sensitivity"):
        raise CxrError(f"{names[0]} {method!r} is not youden or sensitivity")
    if target_sensitivity is not None and not 0 < target_sensitivity <= 1:
        raise CxrError(f"{names[1]} {target_sensitivity:g} is not in (0, 1]")


def recalibrate(
    predictor: Predictor | str | os.PathLike, method: str = "youden", target_sensitivity: float | None = None,
    temperature: bool = True, console: Any = None,
) -> dict[str, Any]:
    """What ``cxr calibrate`` does: :func:`calibrate_run`, then the files in ``RUN/export/`` brought up to date (a
    calibration stopped in between is finished by the next command that loads the run), with notes on ``console``
    (stderr by default) about the exports.

    Args:
        predictor: The run, loaded (``check_calibration=False`` is right here), or its directory.
        method, target_sensitivity, temperature: As for :func:`calibrate_run`.
        console: Where notes go.

    Returns:
        The updated ``labels.json`` content.
    """
    from cxrkit.console import notes_console
    from cxrkit.serve.predictor import CALIBRATING

    if not isinstance(predictor, Predictor):
        predictor = Predictor(predictor, check_calibration=False)
    console = console or notes_console()
    before = {key: predictor.labels_info.get(key) for key in ("temperature", "threshold", "threshold_method")}
    check_writable(predictor.run.path / "labels.json")  # before the validation split is predicted
    predictor.begin_calibration()
    try:
        info = calibrate_run(predictor, method, target_sensitivity, temperature, console)
    except CxrError:  # nothing was written (say, no validation split): nothing for the next command to finish
        with contextlib.suppress(OSError):  # a read-only disk refuses even to remove a file that is not there
            (predictor.run.path / "export" / CALIBRATING).unlink(missing_ok=True)
        raise
    for note in calibration_notes(info):
        console.print(note, highlight=False)
    try:
        refreshed, unreadable = predictor.refresh_exports(console)
    except CxrError as err:
        raise CxrError(f"the calibration is saved in labels.json, but the files in {predictor.run.path / 'export'} "
                       f"were not brought up to date: {err}; the next command that loads the run finishes it "
                       "(or run cxr calibrate again)") from err
    if refreshed:
        console.print("brought the calibration of " + ", ".join(str(path) for path in refreshed) + " up to date",
                      highlight=False)
    if unreadable:
        one = len(unreadable) == 1
        console.print("note: " + ", ".join(str(path) for path in unreadable) + f" cannot be read, so "
                      f"{'it keeps' if one else 'they keep'} the old calibration; `cxr export` writes "
                      f"{'it' if one else 'them'} again (and --engine does on its next use)", highlight=False)
    if any(info.get(key) != value for key, value in before.items()):
        console.print("note: files exported elsewhere (cxr export -o) keep the calibration they were exported "
                      "with (their threshold and temperature show which); export them again",
                      highlight=False)
    return info


def fit_calibration(
    predictor: Predictor, method: str = "youden", target_sensitivity: float | None = None,
    temperature: bool = True, console: Any = None, strict_threshold: bool = True,
) -> dict[str, Any]:
    """What :func:`calibrate_run` fits, for ``predictor``'s model and engine, without writing anything:
    ``temperature``, ``calibrated_on``, ``calibration_images``, ``val_ece_before``, ``val_ece_after`` and, for a
    binary task, ``threshold`` and ``threshold_method``."""
    from cxrkit.eval.calibration import apply_temperature, expected_calibration_error, fit_temperature
    from cxrkit.eval.evaluate import mapped_targets, select_data
    from cxrkit.eval.metrics import choose_threshold

    check_threshold_options(method, target_sensitivity)
    if target_sensitivity is not None:
        method = "sensitivity"
    if method == "sensitivity" and target_sensitivity is None:
        raise CxrError("threshold method 'sensitivity' needs a target sensitivity, e.g. --target-sensitivity 0.95")
    ds, _, _, _ = select_data(predictor, None, "val")  # its errors say why (no val split, the data changed)
    targets = mapped_targets(ds, predictor.labels, None)
    raw = predictor.predict_dataset(ds, console=console, calibrated=False)
    t = fit_temperature(predictor.task, targets, raw) if temperature else 1.0
    probs = apply_temperature(predictor.task, raw, t)
    info: dict[str, Any] = {
        "temperature": float(t), "calibrated_on": "val", "calibration_images": len(ds),
        "val_ece_before": expected_calibration_error(predictor.task, targets, raw),
        "val_ece_after": expected_calibration_error(predictor.task, targets, probs),
    }
    if predictor.task == "binary":
        try:
            threshold = choose_threshold(targets, probs[:, 1], method=method, target_sensitivity=target_sensitivity)
        except CxrError as err:  # e.g. a tiny validation split holding one class
            if strict_threshold:
                raise
            info["threshold"], info["threshold_method"] = 0.5, f"default (not chosen: {err})"
        else:
            info["threshold"] = float(threshold)
            info["threshold_method"] = (f"sensitivity>={target_sensitivity:g}" if method == "sensitivity" else method)
    return info


def calibration_notes(info: dict[str, Any]) -> list[str]:
    """What a user should know about a calibration (``labels.json`` content): a temperature at the end of its
    search interval, and a validation ECE that the temperature made worse."""
    from cxrkit.eval.calibration import TEMPERATURE_BOUNDS

    notes = []
    t, n = float(info.get("temperature") or 1.0), info.get("calibration_images")
    low, high = TEMPERATURE_BOUNDS
    if t <= low * 1.001:
        notes.append(f"note: the temperature stopped at its lower bound {low:g}: on the {n} validation images, "
                     "sharper probabilities always fitted better (the images are separated nearly perfectly, or "
                     "nearly all belong to the class the model favours), so they are as sharp as allowed; more "
                     "validation images give a meaningful fit")
    elif t >= high * 0.999:
        notes.append(f"note: the temperature stopped at its upper bound {high:g}: on the {n} validation images, "
                     "flatter probabilities always fitted better (the model does no better than chance, or it is "
                     "confidently wrong on some images), so they are as flat as allowed; more validation images or "
                     "more training give a meaningful fit")
    before, after = info.get("val_ece_before"), info.get("val_ece_after")
    if before is not None and after is not None and after > before + 1e-9:
        notes.append(f"note: validation ECE rose ({before:.4f} -> {after:.4f}): the temperature minimises the "
                     f"log-loss, not ECE, which is noisy on {n} images; `cxr calibrate RUN --no-temperature` keeps "
                     "the raw probabilities")
    return notes
