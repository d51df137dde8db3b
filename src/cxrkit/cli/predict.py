"""``cxr predict``: labels and probabilities for images, folders and glob patterns."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer


def predict(
    run: Path = typer.Argument(..., help="Run directory"),
    inputs: list[str] = typer.Argument(..., help="Image files, folders or glob patterns"),
    format_: Optional[str] = typer.Option(
        None, "--format", "-f", help="table, json or csv (default: table on stdout; for -o, json for a .json file, "
                                     "else csv)"),
    output: Path = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    engine: str = typer.Option(
        "torch", "--engine", help="torch, onnx (ONNX Runtime; exported on first use), onnx-int8 (ONNX Runtime in int8; "
                                  "quantized on first use with ranges from training images) or auto"),
) -> None:
    """Predict images; unreadable files are listed with the reason and make the exit status non-zero."""
    from cxrkit.errors import CxrError
    from cxrkit.runs import Run, atomic_write_text
    from cxrkit.serve.predictor import Predictor, expand_inputs

    format_ = _output_format(format_, output)
    paths = expand_inputs(inputs)
    if not paths:
        raise CxrError("no image found in " + " ".join(inputs))
    if output is not None:
        _check_output(output, Run.open(run), paths)
    predictor = Predictor(run, checkpoint=checkpoint, engine=engine)
    results = _predict_with_progress(predictor, paths, batch_size)
    failed = [r for r in results if r.error]
    if format_ == "table" and output is None:
        _print_table(results, predictor.labels, predictor.task, predictor.operating_threshold)
    else:
        text = _render(results, predictor.labels, format_)
        if output is not None:
            atomic_write_text(output, text)
        else:
            sys.stdout.write(text)
    for r in failed:
        print(f"error: {r.error}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(results)} files could not be predicted", file=sys.stderr)
        raise typer.Exit(1)


def _output_format(format_: str | None, output: Path | None) -> str:
    """``--format``, or the one ``-o``'s suffix names; a file asked for as a table is CSV. A suffix that names the
    other format than ``--format`` is refused, not written in the wrong format."""
    from cxrkit.errors import CxrError

    if format_ is not None and format_ not in ("table", "json", "csv"):
        raise CxrError(f"--format {format_!r} is not table, json or csv")
    if output is None:
        return format_ or "table"
    named = {".json": "json", ".csv": "csv"}.get(output.suffix.lower())
    if format_ in ("json", "csv") and named not in (None, format_):
        raise CxrError(f"-o {output} names {named} but --format is {format_}; give one of them")
    return named or (format_ if format_ in ("json", "csv") else "csv")


def _check_output(output: Path, run: Any, paths: list[str]) -> None:
    """Refuse, before predicting, an output that cannot be written or would replace an input or the run's state."""
    from cxrkit.errors import CxrError
    from cxrkit.runs import check_writable

    target = output.resolve()
    if any(Path(p).resolve() == target for p in paths):
        raise CxrError(f"-o {output} is one of the images to predict; choose another file")
    owner = run.owns(output)
    if owner:
        raise CxrError(f"-o {output} is {owner}; choose another file")
    check_writable(output)


def _predict_with_progress(predictor: Any, paths: list[str], batch_size: int) -> list:
    """Every file's prediction, with a progress bar (files, images/s, time left) on stderr when there is more than
    one batch (drawn on a terminal only; see :func:`~cxrkit.train.loop.make_progress`)."""
    from cxrkit.console import notes_console
    from cxrkit.train.loop import make_progress

    results = []
    with make_progress(notes_console(), enabled=len(paths) > batch_size) as progress:
        task = progress.add_task("predict", total=len(paths), rate="")
        start = time.perf_counter()
        for result in predictor.predict_files(paths, batch_size):
            results.append(result)
            rate = len(results) / max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=1, rate=f"{rate:.1f} img/s")
    return results


def _render(results: list, labels: list[str], format_: str) -> str:
    from cxrkit.runs import csv_text

    if format_ == "json":
        return json.dumps([r.to_dict() for r in results], indent=2) + "\n"
    return csv_text([r.to_row(labels) for r in results])


# What a table keeps for the image and label columns when it shows one column per label.
WIDE_RESERVE = 40
TOP_SHOWN = 3


def _print_table(results: list, labels: list[str], task: str, threshold: float | None) -> None:
    """The readable table: one column per label where they all fit the width of the terminal (80 columns in a
    pipe); otherwise (ChestX-ray14's 14 findings) the decided labels and the most probable ones with their
    probabilities, as many as are decided and at least three. A multi-label image with no label at or over the
    threshold has an empty label cell, as in JSON and CSV."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from cxrkit.errors import printable

    console = Console()
    wide = WIDE_RESERVE + sum(max(len(name), 6) + 3 for name in labels) <= console.width
    table = Table()
    table.add_column("image", overflow="fold")
    decided = f"labels at p >= {threshold:g}" if task == "multilabel" and threshold is not None else "label"
    table.add_column(decided, overflow="fold")
    if wide:
        for name in labels:
            table.add_column(Text(name), justify="right")
    else:
        table.add_column("most probable", overflow="fold")
    for r in results:
        if r.error:
            continue
        row = [Text(printable(r.source)), Text("\n".join(r.label.split("|")) if task == "multilabel" else r.label)]
        if wide:
            row += [f"{r.probabilities[n]:.4f}" for n in labels]
        else:
            ranked = sorted(labels, key=lambda n: -r.probabilities[n])
            shown = max(TOP_SHOWN, len([n for n in r.label.split("|") if n]))
            row.append(Text("\n".join(f"{n} {r.probabilities[n]:.4f}" for n in ranked[:shown])))
        table.add_row(*row)
    console.print(table)
