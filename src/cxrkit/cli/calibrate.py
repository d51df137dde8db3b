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
    """Calibrate a run on its validation split (never on test); updates RUN/labels.json.

    `cxr train` does this with Youden's J after training; run it again to pick another operating point.
    """
    import json

    from cxrkit.console import notes_console
    from cxrkit.errors import CxrError
    from cxrkit.eval.calibrate import calibrate_run
    from cxrkit.serve.predictor import Predictor

    if method is None:
        method = "youden" if target_sensitivity is None else "sensitivity"
    if method not in ("youden", "sensitivity"):
        raise CxrError(f"--method {method!r} is not youden or sensitivity")
    if method == "youden" and target_sensitivity is not None:
        raise CxrError("--method youden picks its own threshold; --target-sensitivity is for --method sensitivity")
    if target_sensitivity is not None and not 0 < target_sensitivity <= 1:
        raise CxrError(f"--target-sensitivity {target_sensitivity} is not in (0, 1]")
    console = notes_console()
    info = calibrate_run(Predictor(run, checkpoint=checkpoint), method, target_sensitivity, temperature, console)
    keys = ("task", "labels", "temperature", "threshold", "threshold_method", "val_ece_before", "val_ece_after")
    print(json.dumps({k: info.get(k) for k in keys}, indent=2))
