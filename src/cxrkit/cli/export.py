"""``cxr export``: the model of a run as ONNX or TorchScript, with its preprocessing metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def export(
    run: Path = typer.Argument(..., help="Run directory"),
    format_: str = typer.Option("onnx", "--format", "-f", help="onnx, onnx-int8 (ONNX with int8 weights and "
                                "activations, for ONNX Runtime) or torchscript"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last"),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="File to write (default RUN/export/<checkpoint>.onnx, .int8.onnx or "
                                     ".torchscript.pt)"),
    calibration_images: Optional[int] = typer.Option(
        None, "--calibration-images", min=1,
        help="onnx-int8: training images whose activations set the int8 ranges (default 256)"),
    fp32_convs: Optional[int] = typer.Option(
        None, "--fp32-convs", min=0, help="onnx-int8: keep the first N convolutions in fp32 (more accurate, slower; "
                                          "default 0)"),
) -> None:
    """Export the model with labels, input size, mean/std, threshold and temperature in the file, and check it.

    onnx and torchscript hold the fp32 model and must give PyTorch's outputs (to 1e-4). onnx-int8 is quantized
    with ranges from training images and gets its own temperature and threshold, fitted on the validation split as
    the run's were; its decisions on the validation images are compared with the fp32 model's. When they differ
    too often, keep the first convolutions in fp32 with --fp32-convs (see docs/performance.md).

    The file replaces an earlier one only once it is complete and checked; a failed export leaves nothing."""
    from cxrkit.errors import CxrError
    from cxrkit.export.run import FORMATS, export_run

    if format_ not in FORMATS:
        raise CxrError(f"--format {format_!r} is not one of {', '.join(FORMATS)}")
    if format_ != "onnx-int8":
        given = [name for name, value in (("--calibration-images", calibration_images), ("--fp32-convs", fp32_convs))
                 if value is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise CxrError(f"{' and '.join(given)} {verb} to --format onnx-int8 only, not {format_}")
    print(export_run(run, format_, checkpoint, output, 256 if calibration_images is None else calibration_images,
                     fp32_convs or 0))
