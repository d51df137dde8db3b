"""``cxr export``: the model of a run as ONNX or TorchScript, with its preprocessing metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

FORMATS = ("onnx", "torchscript")


def export(
    run: Path = typer.Argument(..., help="Run directory"),
    format_: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last"),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="File to write (default RUN/export/<checkpoint>.onnx or .torchscript.pt)"),
) -> None:
    """Export the model (fp32) with labels, input size, mean/std, threshold and temperature in the file, and check
    that the exported model gives PyTorch's outputs."""
    from cxrkit.errors import CxrError
    from cxrkit.serve.predictor import Predictor
    from cxrkit.train.runtime import setup_runtime

    if format_ not in FORMATS:
        raise CxrError(f"--format {format_!r} is not one of {', '.join(FORMATS)}")
    predictor = Predictor(run, checkpoint, runtime=setup_runtime("cpu", "fp32", channels_last=False, workers=0))
    metadata = predictor.export_metadata()
    size = predictor.preprocessing.size
    suffix = ".onnx" if format_ == "onnx" else ".torchscript.pt"
    path = output or predictor.run.path / "export" / f"{checkpoint}{suffix}"
    from cxrkit.export import max_difference

    if format_ == "onnx":
        from cxrkit.export.onnx import OnnxModel, export_onnx

        export_onnx(predictor.model, path, size, metadata)
        exported = OnnxModel(path)
    else:
        from cxrkit.export.torchscript import export_torchscript, load_torchscript

        export_torchscript(predictor.model, path, size, metadata)
        exported, _ = load_torchscript(path)
    difference = max_difference(predictor.model, exported, size)
    typer.echo(f"{format_}: {path.stat().st_size / 1e6:.1f} MB, {len(predictor.labels)} outputs, input "
               f"3x{size}x{size}; max |exported - PyTorch| on 4 random inputs: {difference:.2e}", err=True)
    if difference > 1e-4:
        raise CxrError(f"{path}: the exported model differs from PyTorch by {difference:.2e} (over 1e-4)")
    print(path)
