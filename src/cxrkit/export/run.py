"""Export a run's model: ONNX or TorchScript (checked against PyTorch to 1e-4) or int8 ONNX (compared with fp32 on
the validation split), with labels, preprocessing, threshold and temperature in the file. What ``cxr export`` runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrkit.errors import CxrError
from cxrkit.runs import Run, check_writable, staged

if TYPE_CHECKING:
    from cxrkit.serve.predictor import Predictor

FORMATS = ("onnx", "onnx-int8", "torchscript")
SUFFIXES = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "torchscript": ".torchscript.pt"}
LOW_AGREEMENT = 0.95
"""Below this share of validation images (multi-label: image-finding pairs) decided as fp32 decides,
``cxr export -f onnx-int8`` suggests ``--fp32-convs`` (study 1's three classes: 88% with every convolution in int8,
97% with the first 10 in fp32)."""


def export_run(run: Run | str | os.PathLike, format: str = "onnx", checkpoint: str = "best",  # noqa: A002
               output: str | os.PathLike | None = None, calibration_images: int = 256, fp32_convs: int = 0,
               console: Any = None) -> Path:
    """Export ``run``'s ``checkpoint`` in ``format`` to ``output`` (default ``RUN/export/<checkpoint>.onnx``,
    ``.int8.onnx`` or ``.torchscript.pt``) and check it. The file replaces an earlier one only once it is complete and
    checked; a failed export leaves nothing.

    Args:
        run: The run (or its directory).
        format: ``onnx``, ``onnx-int8`` or ``torchscript``.
        checkpoint: ``best`` or ``last``.
        output: The file to write.
        calibration_images: onnx-int8: training images whose activations set the int8 ranges.
        fp32_convs: onnx-int8: the first convolutions kept in fp32 (more accurate, slower).
        console: Where the check's summary and notes go; stderr by default.

    Returns:
        The exported file.
    """
    from cxrkit.console import notes_console
    from cxrkit.serve.predictor import Predictor
    from cxrkit.train.runtime import setup_runtime

    if format not in FORMATS:
        raise CxrError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    opened = run if isinstance(run, Run) else Run.open(run)
    default = opened.path / "export" / f"{checkpoint}{SUFFIXES[format]}"
    path = Path(output) if output is not None else default
    owner = opened.owns(path) if path.resolve() != default.resolve() else None
    if owner:
        raise CxrError(f"{path} is {owner}; choose another file")
    check_writable(path)
    console = console or notes_console()
    predictor = Predictor(opened, checkpoint, runtime=setup_runtime("cpu", "fp32", channels_last=False, workers=0),
                          console=console)
    with staged(path) as partial:
        if format == "onnx-int8":
            _export_int8(predictor, partial, path, calibration_images, fp32_convs, console)
        else:
            _export_fp32(predictor, format, partial, path, console)
    return path


def _export_fp32(predictor: Predictor, format_: str, partial: Path, path: Path, console: Any) -> None:
    """Write ``format_`` to ``partial`` and check it against PyTorch; ``path`` is the name it will have."""
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
    console.print(f"{format_}: {partial.stat().st_size / 1e6:.1f} MB, {len(predictor.labels)} outputs, input "
                  f"3x{size}x{size}; max |exported - PyTorch| on 4 random inputs: {difference:.2e}", highlight=False)
    if difference > 1e-4:
        raise CxrError(f"{path}: the exported model differs from PyTorch by {difference:.2e} (over 1e-4); "
                       "nothing was written")


def _export_int8(predictor: Predictor, partial: Path, path: Path, images: int, fp32_convs: int, console: Any) -> None:
    """Quantize to ``partial`` (named ``path`` once complete), fit its calibration, and compare its decisions with
    fp32 PyTorch's on the validation split (a run without one is exported unchecked, with a note)."""
    from cxrkit.eval.evaluate import select_data

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
    console.print(f"onnx-int8: {partial.stat().st_size / 1e6:.1f} MB, {len(predictor.labels)} outputs, input "
                  f"3x{size}x{size}, temperature {predictor.temperature:.3f}, threshold {threshold}; {note}",
                  highlight=False)
