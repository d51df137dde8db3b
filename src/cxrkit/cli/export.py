"""``cxr export``: the model of a run as ONNX or TorchScript, with its preprocessing metadata."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:
    from cxrkit.serve.predictor import Predictor

FORMATS = ("onnx", "onnx-int8", "torchscript")
SUFFIXES = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "torchscript": ".torchscript.pt"}
LOW_AGREEMENT = 0.95
"""Below this share of validation images (multi-label: image-finding pairs) decided as fp32 decides,
``cxr export -f onnx-int8`` suggests ``--fp32-convs`` (study 1's three classes: 88% with every convolution in int8,
97% with the first 10 in fp32)."""


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
    from cxrkit.runs import Run, check_writable, staged
    from cxrkit.serve.predictor import Predictor
    from cxrkit.train.runtime import setup_runtime

    if format_ not in FORMATS:
        raise CxrError(f"--format {format_!r} is not one of {', '.join(FORMATS)}")
    if format_ != "onnx-int8":
        given = [name for name, value in (("--calibration-images", calibration_images), ("--fp32-convs", fp32_convs))
                 if value is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise CxrError(f"{' and '.join(given)} {verb} to --format onnx-int8 only, not {format_}")
    opened = Run.open(run)
    default = opened.path / "export" / f"{checkpoint}{SUFFIXES[format_]}"
    path = output or default
    owner = opened.owns(path) if Path(path).resolve() != default.resolve() else None
    if owner:
        raise CxrError(f"-o {path} is {owner}; choose another file")
    check_writable(path)
    predictor = Predictor(opened, checkpoint, runtime=setup_runtime("cpu", "fp32", channels_last=False, workers=0))
    with staged(path) as partial:
        if format_ == "onnx-int8":
            _export_int8(predictor, partial, path, 256 if calibration_images is None else calibration_images,
                         fp32_convs or 0)
        else:
            _export_fp32(predictor, format_, partial, path)
    print(path)


def _export_fp32(predictor: Predictor, format_: str, partial: Path, path: Path) -> None:
    """Write ``format_`` to ``partial`` and check it against PyTorch; ``path`` is the name it will have."""
    from cxrkit.errors import CxrError
    from cxrkit.export import max_difference

    metadata = predictor.export_metadata()
    size = predictor.preprocessing.size
    if format_ == "onnx":
        from cxrkit.export.onnx import OnnxModel, export_onnx

        export_onnx(predictor.model, partial, size, metadata)
        exported = OnnxModel(partial)
    else:
        from cxrkit.export.torchscript import export_torchscript, load_torchscript

        export_torchscript(predictor.model, partial, size, metadata)
        exported, _ = load_torchscript(partial)
    difference = max_difference(predictor.model, exported, size)
    typer.echo(f"{format_}: {partial.stat().st_size / 1e6:.1f} MB, {len(predictor.labels)} outputs, input "
               f"3x{size}x{size}; max |exported - PyTorch| on 4 random inputs: {difference:.2e}", err=True)
    if difference > 1e-4:
        raise CxrError(f"{path}: the exported model differs from PyTorch by {difference:.2e} (over 1e-4); "
                       "nothing was written")


def _export_int8(predictor: Predictor, partial: Path, path: Path, images: int, fp32_convs: int) -> None:
    """Quantize to ``partial`` (named ``path`` once complete), fit its calibration, and compare its decisions with
    fp32 PyTorch's on the validation split (a run without one is exported unchecked, with a note)."""
    import numpy as np

    from cxrkit.console import notes_console
    from cxrkit.errors import CxrError
    from cxrkit.eval.evaluate import select_data

    console = notes_console()
    try:
        val = select_data(predictor, None, "val")[0]
    except CxrError as err:
        val, note = None, f"not compared with fp32: {err}"
    fp32 = predictor.predict_dataset(val, console=console) if val is not None else None
    decided = predictor.decide(fp32) if fp32 is not None else []  # with the run's fp32 threshold
    predictor.int8_file(predictor.model, console, images=images, path=partial, fp32_convs=fp32_convs, name=path)
    predictor.use_onnx(partial, console)
    if fp32 is not None:
        int8 = predictor.predict_dataset(val, console=console)
        decided8 = predictor.decide(int8)
        agree = sum(a == b for a, b in zip(decided, decided8))
        note = (f"on the {len(int8)} validation images, int8 and fp32 decide the same for {agree} "
                f"({agree / len(int8):.1%})")
        share = agree / len(int8)
        if predictor.task == "multilabel":  # a whole set of findings rarely matches; each finding is the fairer count
            sets = [(set(a.split("|")), set(b.split("|"))) for a, b in zip(decided, decided8)]
            same = sum((label in a) == (label in b) for a, b in sets for label in predictor.labels)
            share = same / (len(sets) * len(predictor.labels))
            note += f" and {same} of {len(sets) * len(predictor.labels)} image-finding decisions ({share:.1%})"
        note += f"; largest probability difference {float(np.abs(int8 - fp32).max()):.3f}"
        if share < LOW_AGREEMENT:
            note += (f". That is under {LOW_AGREEMENT:.0%}: keeping the first convolutions in fp32 (--fp32-convs, "
                     f"now {fp32_convs}) brings int8 closer to fp32 at some cost in speed; see docs/performance.md")
    threshold = "none" if predictor.operating_threshold is None else f"{predictor.operating_threshold:.4f}"
    size = predictor.preprocessing.size
    typer.echo(f"onnx-int8: {partial.stat().st_size / 1e6:.1f} MB, {len(predictor.labels)} outputs, input "
               f"3x{size}x{size}, temperature {predictor.temperature:.3f}, threshold {threshold}; {note}", err=True)
