"""``cxr compare``: run a matrix of recipes from one spec and write a leaderboard."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:
    from cxrkit.compare.runner import Plan


def _print_cells(plan: Plan) -> None:
    """The cells as a table on stderr (axes and status), then their ids on stdout, one a line."""
    from rich.table import Table

    from cxrkit.compare.leaderboard import content_width, fit_columns
    from cxrkit.compare.render import Column
    from cxrkit.compare.runner import cell_status
    from cxrkit.console import notes_console

    console = notes_console()
    table = Table(title=f"{plan.spec.name}: {len(plan.cells)} cells in {plan.root}")
    columns = [Column("cell", "cell"), *(Column(axis.name, axis.name) for axis in plan.spec.matrix),
               Column("stages", "stages"), Column("status", "status")]
    rows = [{**cell.labels, "cell": cell.id, "status": cell_status(plan, cell),
             "stages": ", ".join(f"{stage.trainable} x{stage.epochs}" for stage in cell.recipe.stages)}
            for cell in plan.cells]
    columns, _, _ = fit_columns(columns, rows, console.width, "cell")  # the axes go first: the id names them
    for column in columns:
        table.add_column(column.header, no_wrap=column.key == "cell", min_width=content_width(column, rows))
    for row in rows:
        table.add_row(*(column.text(row) for column in columns))
    console.print(table)
    for cell in plan.cells:
        print(cell.id)


def compare(
    spec: Path = typer.Argument(..., help="Comparison spec YAML (see comparisons/)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the spec's out, runs/compare)"),
    only: list[str] = typer.Option([], "--only", help="run only cells whose id contains this"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the cells and exit"),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key in every cell"),
) -> None:
    """Train and evaluate every cell of a comparison; resumable. The last line printed is the leaderboard path.

    Exits with 1 when some cell failed (the leaderboard says why), 2 on a mistake in the spec.
    """
    import csv

    from cxrkit.compare.runner import plan_comparison, print_skipped, run_comparison, select_cells
    from cxrkit.console import notes_console

    if dry_run:
        plan = plan_comparison(spec, out, set_)
        print_skipped(plan, notes_console())
        plan.cells = select_cells(plan.cells, only)
        _print_cells(plan)
        return
    console = notes_console()
    leaderboard = run_comparison(spec, out, console, only=only, overrides=set_)
    print(leaderboard)
    with leaderboard.open(newline="") as fh:
        if any(row["status"] == "failed" for row in csv.DictReader(fh)):
            raise typer.Exit(1)
