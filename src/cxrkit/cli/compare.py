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

    from cxrkit.compare.runner import cell_status
    from cxrkit.console import notes_console

    console = notes_console()
    table = Table(title=f"{plan.spec.name}: {len(plan.cells)} cells in {plan.root}")
    rows = [[cell.id, *cell.labels.values(), ", ".join(f"{s.trainable} x{s.epochs}" for s in cell.recipe.stages),
             cell_status(plan, cell)] for cell in plan.cells]
    headers = ["cell", *(axis.name for axis in plan.spec.matrix), "stages", "status"]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    # the cell id already names the axes: they go first when the table does not fit, values are never cut
    keep = list(range(len(headers)))
    for axis in range(1, len(headers) - 2):
        if sum(widths[i] + 3 for i in keep) + 1 <= console.width:
            break
        keep.remove(axis)
    for i in keep:
        table.add_column(headers[i], no_wrap=i == 0, min_width=widths[i])
    for row in rows:
        table.add_row(*(row[i] for i in keep))
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
