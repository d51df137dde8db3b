"""``cxr report``: one self-contained HTML page of a run (summary, recipe, data, metrics, figures, environment)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def report(
    run: Path = typer.Argument(..., help="Run directory"),
    eval_name: Optional[str] = typer.Option(
        None, "--eval", "--name", help="Evaluation folder under RUN/eval/ to report, as `cxr evaluate --name` "
        "named it (default: the most recent one)"
    ),
    open_: bool = typer.Option(False, "--open", help="Open the report in the default web browser"),
) -> None:
    """Write RUN/eval/<name>/report.html (RUN/report.html before any evaluation); prints its path last."""
    from cxrkit.eval.report import build_report

    path = build_report(run, eval_name)
    if open_:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            from cxrkit.console import notes_console

            notes_console().print(f"note: no web browser could be started here; open {path} yourself",
                                  highlight=False)
    print(path)
