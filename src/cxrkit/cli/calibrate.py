"""``cxr calibrate``: refit the temperature and choose the operating threshold on the validation split."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def calibrate(
    run: Path = typer.Argument(..., help="Run directory"),
    target_sensitivity: Optional[float] = typer.Option(
        None, "--target-sensitivity", help="Highest threshold whose validation sensitivity reaches this, e.g. 0.95"),
    method: Optional[str] = typer.Option(
        None, "--method", help="youden or sensitivity (default: sensitivity with --target-sensitivity, else youden)"),
    temperature: bool = typer.Option(True, "--temperature/--no-temperature", help="Fit temperature scaling"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last"),
) -> None:
    """Calibrate a run on its validation split (never on test); updates RUN/labels.json and RUN/export/.

    `cxr train` does this with Youden's J after training; run it again to pick another operating point. The files in
    RUN/export/ get the new values at once (int8 ones fit their own); copies exported elsewhere keep the old ones.
    --method and --target-sensitivity are for binary runs: a multi-class or multi-label run gets its temperature only.
    """
    import json

    from cxrkit.console import notes_console
    from cxrkit.errors import CxrError
    from cxrkit.eval.calibrate import check_threshold_options, recalibrate
    from cxrkit.serve.predictor import Predictor

    threshold_options = [name for name, value in (("--method", method), ("--target-sensitivity", target_sensitivity))
                         if value is not None]
    if method is None:
        method = "youden" if target_sensitivity is None else "sensitivity"
    check_threshold_options(method, target_sensitivity, ("--method", "--target-sensitivity"))
    if method == "youden" and target_sensitivity is not None:
        raise CxrError("--method youden picks its own threshold; --target-sensitivity is for --method sensitivity")
    console = notes_console()
    predictor = Predictor(run, checkpoint=checkpoint, check_calibration=False)
    if predictor.task != "binary" and threshold_options:
        rule = "the most probable class" if predictor.task == "multiclass" else "a 0.5 threshold on each label"
        verb = "chooses" if len(threshold_options) == 1 else "choose"
        raise CxrError(f"{' and '.join(threshold_options)} {verb} a binary run's threshold; this {predictor.task} "
                       f"run decides by {rule}. Without them, cxr calibrate fits its temperature")
    info = recalibrate(predictor, method, target_sensitivity, temperature, console)
    keys = ("task", "labels", "temperature", "threshold", "threshold_method", "val_ece_before", "val_ece_after",
            "calibrated_checkpoint")
    print(json.dumps({k: info.get(k) for k in keys}, indent=2))
