"""Run a comparison: every cell trained (or resumed) and evaluated in turn, then the leaderboard rebuilt.

Layout of ``<out>/<spec name>/``: ``comparison.json`` (the resolved spec and the cells), ``cells/<cell id>/`` (a run
directory per cell, plus ``cell.json``: its axes, status, error and parameter counts), ``leaderboard.{csv,md,html}``
and ``curves.png``. Everything is derived from the files, so running the same spec again continues where a killed
comparison stopped: finished and evaluated cells are skipped, an interrupted cell resumes from its last epoch, a
trained but unevaluated cell is evaluated and a failed cell is tried again.
"""

from __future__ import annotations

import os
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from cxrkit.compare.spec import Cell, ComparisonSpec, expand_cells, load_comparison
from cxrkit.config import expand_path, load_recipe
from cxrkit.console import notes_console
from cxrkit.errors import CxrError, first_line, user_message
from cxrkit.runs import Run, atomic_write_json, atomic_write_text, raise_if_interrupted

# recipe keys that do not change what a cell means: a cell run with other values is still the same cell
_EXECUTION_KEYS = ("name", "description", "out", "runtime.workers", "runtime.threads", "runtime.device",
                   "runtime.precision", "runtime.eval_batch_size", "runtime.cache_features", "runtime.cache_engine",
                   "runtime.cache_images", "runtime.channels_last")


@dataclass
class Plan:
    """A comparison ready to run: its spec, cells and folder."""

    spec: ComparisonSpec
    cells: list[Cell]
    root: Path

    def cell_dir(self, cell: Cell) -> Path:
        """The cell's run directory, ``<root>/cells/<cell id>``."""
        return self.root / "cells" / cell.id

    @property
    def eval_name(self) -> str:
        """The evaluation folder of every cell: ``eval/compare-<split>``."""
        return f"compare-{self.spec.evaluate.split}"


def plan_comparison(spec_path: str | Path, out: str | Path | None = None,
                    overrides: list[str] | None = None) -> Plan:
    """Load the spec and resolve its cells; ``out`` overrides the spec's output directory."""
    spec = load_comparison(spec_path, overrides)
    return Plan(spec, expand_cells(spec), Path(out or expand_path(spec.out, "out")) / spec.name)


def cell_status(plan: Plan, cell: Cell) -> str:
    """``new``, ``incomplete`` (training stopped part way), ``trained`` (not evaluated), ``done``, ``failed`` or
    ``recipe changed`` (trained with another recipe than the spec's now: running the comparison refuses it, see
    :func:`check_existing_cells`)."""
    from cxrkit.train.api import run_is_complete

    run = Run(plan.cell_dir(cell))
    info = read_cell_info(run.path)
    if not run.file("recipe.yaml").is_file():  # never started, or failed before its run was made (a missing data root)
        return "failed" if info.get("status") == "failed" else "new"
    if recipe_changes(plan, cell):
        return "recipe changed" if run.has_checkpoint("last") else "new"  # never trained: cleared when run
    if info.get("status") == "failed":
        return "failed"
    evaluated = run.path / "eval" / plan.eval_name
    written = [evaluated / "metrics.json", evaluated / "predictions.csv"]
    if all(p.is_file() for p in written) and run.has_checkpoint("last"):
        newer = min(p.stat().st_mtime_ns for p in written) >= run.checkpoint_path("last").stat().st_mtime_ns
        if info.get("status") == "done" and newer:
            return "done"  # evaluated after its last checkpoint: no need to load that checkpoint again
    if not run_is_complete(run):
        return "incomplete"
    # "running": the comparison was stopped before it recorded the evaluation, so it is redone
    return "done" if all(p.is_file() for p in written) and info.get("status") != "running" else "trained"


def read_cell_info(cell_dir: Path) -> dict[str, Any]:
    """``cell.json`` of a cell folder, or an empty mapping."""
    import json

    path = cell_dir / "cell.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists as ``{"stages.0.lr": 1e-3, ...}``."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) and data else None
    if items is None:
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def recipe_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Recipe keys whose values differ, other than those that only say how a run executes."""
    a, b = _flat(saved), _flat(wanted)
    keys = [k for k in dict.fromkeys([*a, *b]) if not k.startswith(_EXECUTION_KEYS)]
    return [k for k in keys if a.get(k) != b.get(k)]


def recipe_changes(plan: Plan, cell: Cell) -> list[str]:
    """The recipe keys that the cell's folder was trained with other values of than the spec gives now (none for
    a folder without a recipe)."""
    saved = plan.cell_dir(cell) / "recipe.yaml"
    if not saved.is_file():
        return []
    return recipe_differences(load_recipe(saved).to_dict(), cell.recipe.to_dict())


def check_existing_cells(plan: Plan) -> None:
    """Refuse to mix results: a cell folder whose saved recipe differs from the spec's is an error once it has
    trained; one that never trained (no checkpoint) is cleared and started again."""
    for cell in plan.cells:
        run = Run(plan.cell_dir(cell))
        changed = recipe_changes(plan, cell)
        if not changed:
            continue
        if not run.has_checkpoint("last"):
            shutil.rmtree(run.path)
            continue
        raise CxrError(f"cell {cell.id} in {run.path} was trained with a different recipe ({', '.join(changed[:4])} "
                       "changed); delete that folder or choose another --out")


def _write_cell_info(plan: Plan, cell: Cell, **fields: Any) -> None:
    path = plan.cell_dir(cell)
    info = {**read_cell_info(path), "id": cell.id, "axes": cell.labels, **fields}
    atomic_write_json(path / "cell.json", info)


def count_parameters(run: Run, model: Any = None) -> dict[str, Any]:
    """Trainable (in the last stage) and total parameters of a run's model (``model``, or built without weights).

    ``cxr train`` prints these per stage; the comparison keeps the last stage's in ``cell.json``.
    """
    from cxrkit import pipeline
    from cxrkit.models.freeze import apply_trainable

    recipe = load_recipe(run.file("recipe.yaml"))
    if model is None:
        labels = run.read_json("labels.json")["labels"]
        model = pipeline.build_model(recipe.model, len(labels), weights="none")
    plan = apply_trainable(model, recipe.stages[-1].trainable)
    return {"trainable": plan.trainable_params, "total": plan.total_params, "stage": recipe.stages[-1].name}


def train_cell(plan: Plan, cell: Cell, status: str, console: Console) -> None:
    """Train a new cell, resume an interrupted one, then evaluate it and count its parameters."""
    from cxrkit.eval.evaluate import evaluate_run
    from cxrkit.serve.predictor import Predictor
    from cxrkit.train.api import train_recipe

    run = Run(plan.cell_dir(cell))
    if status == "new" or (status == "failed" and not run.file("recipe.yaml").is_file()):
        (run.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        train_recipe(cell.recipe, run=run, console=console)
    elif status in ("incomplete", "failed"):
        train_recipe(resume=run, console=console)
    evaluate = plan.spec.evaluate
    predictor = Predictor(run, checkpoint=evaluate.checkpoint)
    metrics, _ = evaluate_run(predictor, split=evaluate.split, name=plan.eval_name, batch_size=evaluate.batch_size)
    scores = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("accuracy", "f1_macro", "auc") if metrics.get(k) is not None)
    console.print(f"{cell.id}: {evaluate.split} {scores}", highlight=False)
    _write_cell_info(plan, cell, params=count_parameters(run, predictor.model))


def run_cell(plan: Plan, cell: Cell, console: Console) -> str:
    """Run one cell unless it is done; a failure is recorded in ``cell.json`` (one line) and returned as
    ``failed`` so the other cells still run. ``CXR_DEBUG=1`` raises instead."""
    status = cell_status(plan, cell)
    if status == "done":
        console.print(f"[dim]{escape(cell.id)}: done, skipped[/]")
        return status
    plan.cell_dir(cell).mkdir(parents=True, exist_ok=True)
    _write_cell_info(plan, cell, status="running", error=None)
    (plan.cell_dir(cell) / "error.txt").unlink(missing_ok=True)  # an earlier failure's, which this try replaces
    try:
        train_cell(plan, cell, status, console)
    except Exception as err:  # noqa: BLE001 - recorded in cell.json and the leaderboard, traceback in error.txt
        if os.environ.get("CXR_DEBUG"):
            raise
        message = user_message(err) if isinstance(err, CxrError) else f"{type(err).__name__}: {first_line(err)}"
        if not isinstance(err, CxrError):
            _write_traceback(plan.cell_dir(cell) / "error.txt", console)
        _write_cell_info(plan, cell, status="failed", error=message)
        console.print(f"[red]{escape(cell.id)}: failed[/]: {escape(message)}")
        return "failed"
    _write_cell_info(plan, cell, status="done", error=None)
    return "done"


def _write_traceback(path: Path, console: Console) -> None:
    """Write the traceback being handled to ``path``; a failed write (a full disk) is a note, so that the cell's
    own error is the one recorded and the comparison goes on."""
    try:
        atomic_write_text(path, traceback.format_exc())
    except CxrError as err:
        console.print(f"note: the traceback was not saved: {escape(str(err))}", highlight=False)


def select_cells(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """Cells whose id contains any of ``only`` (all of them when ``only`` is empty)."""
    if not only:
        return list(cells)
    chosen = [c for c in cells if any(part in c.id for part in only)]
    if not chosen:
        raise CxrError(f"--only {' '.join(only)} matches no cell; the cells are {', '.join(c.id for c in cells)}")
    return chosen


def write_comparison_json(plan: Plan) -> None:
    """``comparison.json``: the resolved spec and every cell with its axes, overrides, folder and status."""
    cells = [{**c.to_dict(), "path": str(plan.cell_dir(c)), "status": cell_status(plan, c)} for c in plan.cells]
    atomic_write_json(plan.root / "comparison.json", {"spec": plan.spec.to_dict(), "cells": cells})


def print_skipped(plan: Plan, console: Console) -> None:
    """A line for each cell that skips some ``--set`` of a stage it does not have."""
    for cell in plan.cells:
        if cell.skipped:
            console.print(f"note: cell {cell.id} has {len(cell.recipe.stages)} stage(s), so it skips --set "
                          f"{', '.join(cell.skipped)}", highlight=False)


def run_comparison(spec_path: str | Path, out: str | Path | None = None, console: Console | None = None,
                   only: list[str] | None = None, overrides: list[str] | None = None) -> Path:
    """Run every cell of a comparison spec (sequentially) and write its leaderboard.

    Args:
        spec_path: the comparison spec (YAML; see :mod:`cxrkit.compare.spec`).
        out: output directory (default: the spec's ``out``); the comparison lives in ``<out>/<spec name>/``.
        console: where progress goes (default: stderr).
        only: run only the cells whose id contains one of these; the leaderboard still lists every cell.
        overrides: ``key=value`` recipe overrides for every cell, applied after the spec's ``set`` and axes.

    Returns:
        The path of ``leaderboard.csv`` (``.md``, ``.html`` and ``curves.png`` lie next to it).
    """
    from cxrkit.compare.leaderboard import write_leaderboard

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CxrError("cxr compare runs its cells one after another in one process; run it without torchrun")
    console = console or notes_console()
    plan = plan_comparison(spec_path, out, overrides)
    print_skipped(plan, console)
    check_existing_cells(plan)
    chosen = select_cells(plan.cells, only)
    plan.root.mkdir(parents=True, exist_ok=True)
    write_comparison_json(plan)
    for index, cell in enumerate(chosen, 1):
        raise_if_interrupted()  # a Ctrl-C that the last cell's work lost (see cxrkit.runs.on_interrupt)
        console.rule(f"cell {index}/{len(chosen)}: {escape(cell.id)}")
        run_cell(plan, cell, console)
        write_comparison_json(plan)
    return write_leaderboard(plan, console)
