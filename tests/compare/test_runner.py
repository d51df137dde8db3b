"""cxr compare end to end on tiny synthetic data: a 2x2 matrix, interrupted and resumed, leaderboards, re-runs that
train nothing, a failing cell, --dry-run and --only."""

import csv
import hashlib
import json
import shutil

import pytest
import typer
from synth import kermany_folder
from typer.testing import CliRunner

import cxrkit.train.api
import cxrkit.train.fit
from cxrkit.cli.compare import compare
from cxrkit.compare import plan_comparison, run_comparison
from cxrkit.compare.leaderboard import evaluation_scores, format_duration
from cxrkit.compare.render import Column
from cxrkit.errors import CxrError
from cxrkit.runs import Run

from .helpers import write_spec

CELLS = ["head-only-s0", "head-only-s1", "two-stage-s0", "two-stage-s1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return kermany_folder(tmp_path_factory.mktemp("xray"), per_class=12, size=32)


class Calls:
    """Counts train_recipe calls (new and resumed) made by the runner."""

    def __init__(self, monkeypatch):
        self.new, self.resumed = [], []
        real = cxrkit.train.api.train_recipe

        def counting(recipe=None, resume=None, console=None, run=None):
            (self.resumed if resume is not None else self.new).append((resume or run).path.name)
            return real(recipe, resume=resume, console=console, run=run)

        monkeypatch.setattr(cxrkit.train.api, "train_recipe", counting)


@pytest.fixture(scope="module")
def compared(data, tmp_path_factory):
    """The 2x2 comparison, killed (KeyboardInterrupt) in the second epoch of two-stage-s0, then run again."""
    folder = tmp_path_factory.mktemp("compare")
    spec = write_spec(folder / "specs", data)
    out = folder / "out"
    epochs = {"n": 0}
    real_epoch = cxrkit.train.fit.Trainer._run_epoch

    def interrupting(self, *args, **kwargs):
        epochs["n"] += 1
        if epochs["n"] == 4:  # head-only-s0, head-only-s1, two-stage-s0 stage 1, then stage 2: killed
            raise KeyboardInterrupt
        return real_epoch(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cxrkit.train.fit.Trainer, "_run_epoch", interrupting)
        with pytest.raises(KeyboardInterrupt):
            run_comparison(spec, out)
    plan = plan_comparison(spec, out)
    from cxrkit.compare import cell_status

    states = {c.id: cell_status(plan, c) for c in plan.cells}
    with pytest.MonkeyPatch.context() as mp:
        calls = Calls(mp)
        leaderboard = run_comparison(spec, out)
    return {"spec": spec, "out": out, "root": out / "tiny", "leaderboard": leaderboard, "before": states,
            "calls": calls}


def test_interrupted_cell_is_resumed_and_the_rest_run(compared):
    assert compared["before"] == {"head-only-s0": "done", "head-only-s1": "done", "two-stage-s0": "incomplete",
                                  "two-stage-s1": "new"}
    assert compared["calls"].resumed == ["two-stage-s0"] and compared["calls"].new == ["two-stage-s1"]
    rows = list(csv.DictReader((compared["root"] / "cells" / "two-stage-s0" / "metrics.csv").open()))
    assert [(r["epoch"], r["stage"]) for r in rows] == [("1", "1"), ("2", "2")]


def test_leaderboard_files_one_row_per_cell(compared):
    root = compared["root"]
    assert compared["leaderboard"] == root / "leaderboard.csv"
    rows = list(csv.DictReader(compared["leaderboard"].open()))
    assert sorted(r["cell"] for r in rows) == CELLS
    for column in ("cell", "status", "backbone", "weights", "strategy", "seed", "first_epoch_train_loss",
                   "first_epoch_val_accuracy", "checkpoint_epoch", "checkpoint_val_accuracy", "checkpoint_val_auc",
                   "test_accuracy", "test_f1_macro", "test_auc",
                   "training_seconds", "training_time", "trainable_params", "total_params"):
        assert column in rows[0], column
    assert {r["status"] for r in rows} == {"done"} and {r["backbone"] for r in rows} == {"mobilenet_v3_small"}
    aucs = [float(r["test_auc"]) for r in rows]
    assert aucs == sorted(aucs, reverse=True)
    for row in rows:  # the val numbers are those of the epoch best.pt holds
        run = Run(root / "cells" / row["cell"])
        epoch = run.load_checkpoint("best")["epoch"]
        recorded = next(r for r in run.read_metrics() if int(r["epoch"]) == epoch)
        assert int(row["checkpoint_epoch"]) == epoch
        assert float(row["checkpoint_val_accuracy"]) == pytest.approx(float(recorded["val_accuracy"]))
    by_cell = {r["cell"]: r for r in rows}
    assert int(by_cell["head-only-s0"]["trainable_params"]) < int(by_cell["two-stage-s0"]["trainable_params"])
    assert by_cell["head-only-s0"]["total_params"] == by_cell["two-stage-s0"]["total_params"]
    markdown = (root / "leaderboard.md").read_text()
    assert markdown.count("\n| ") >= 1 + 4 and "## Mean ± SD over seeds" in markdown
    html = (root / "leaderboard.html").read_text()
    assert "a &lt;tiny&gt; comparison &amp; test" in html and "<tiny>" not in html
    assert all(cell in html for cell in CELLS) and "<style>" in html
    spec = json.loads((root / "comparison.json").read_text())
    assert [c["id"] for c in spec["cells"]] == CELLS and spec["spec"]["evaluate"]["split"] == "test"


def test_curves_png(compared):
    pytest.importorskip("cxrkit.eval.plots")
    assert (compared["root"] / "curves.png").stat().st_size > 1000
    assert "data:image/png;base64," in (compared["root"] / "leaderboard.html").read_text()


def test_every_cell_shares_one_split(compared):
    splits = {(compared["root"] / "cells" / c / "splits.csv").read_text() for c in CELLS}
    assert len(splits) == 1
    assert "share one split" in (compared["root"] / "leaderboard.md").read_text()


def test_a_split_written_with_crlf_line_endings_is_the_same_split(compared):
    """Versions before 2026-12 wrote splits.csv with CRLF: a cell trained then shares the split of one trained now,
    and the fingerprint is the one they printed (the SHA-256 of the CRLF file)."""
    from cxrkit.compare.leaderboard import split_fingerprints

    plan = plan_comparison(compared["spec"], compared["out"])
    path = compared["root"] / "cells" / CELLS[0] / "splits.csv"
    text = path.read_bytes()
    assert b"\r" not in text
    crlf = text.replace(b"\n", b"\r\n")
    try:
        path.write_bytes(crlf)
        fingerprints = split_fingerprints(plan)
    finally:
        path.write_bytes(text)
    assert set(fingerprints) == set(CELLS) and len(set(fingerprints.values())) == 1
    assert fingerprints[CELLS[0]] == hashlib.sha256(crlf).hexdigest()[:12]


def test_second_run_trains_nothing(compared, monkeypatch):
    cells = compared["root"] / "cells"
    stamps = {p: p.stat().st_mtime_ns for p in cells.glob("*/checkpoints/*.pt")}
    calls = Calls(monkeypatch)
    run_comparison(compared["spec"], compared["out"])
    assert calls.new == [] and calls.resumed == []
    assert {p: p.stat().st_mtime_ns for p in cells.glob("*/checkpoints/*.pt")} == stamps


def test_unevaluated_cell_is_evaluated_without_training(compared, monkeypatch):
    evaluated = compared["root"] / "cells" / "head-only-s1" / "eval" / "compare-test"
    shutil.rmtree(evaluated)
    calls = Calls(monkeypatch)
    run_comparison(compared["spec"], compared["out"], only=["head-only-s1"])
    assert calls.new == [] and calls.resumed == []
    assert (evaluated / "metrics.json").is_file()


def test_an_evaluation_stopped_part_way_is_done_again(compared, monkeypatch):
    """A comparison stopped while a cell's evaluation writes its figures: the folder must not pass for a finished
    evaluation (old figures beside new metrics), its files stay as they were, and the next run evaluates the cell
    again without training."""
    import cxrkit.eval.plots
    from cxrkit.compare import cell_status

    cell = compared["root"] / "cells" / "head-only-s1"
    evaluated = cell / "eval" / "compare-test"
    (evaluated / "metrics.json").unlink()  # so that the run evaluates this cell again
    before = {path.name: path.read_bytes() for path in evaluated.iterdir()}

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(cxrkit.eval.plots, "write_eval_figures", stopped)
        with pytest.raises(KeyboardInterrupt):
            run_comparison(compared["spec"], compared["out"], only=["head-only-s1"])
    assert {path.name: path.read_bytes() for path in evaluated.iterdir()} == before  # no metrics.json, nothing new
    plan = plan_comparison(compared["spec"], compared["out"])
    cells = {c.id: c for c in plan.cells}
    assert cell_status(plan, cells["head-only-s1"]) == "trained"
    calls = Calls(monkeypatch)
    run_comparison(compared["spec"], compared["out"], only=["head-only-s1"])
    assert calls.new == [] and calls.resumed == []
    assert (evaluated / "metrics.json").is_file() and list(evaluated.glob("*.png"))
    # stopped after the evaluation but before the comparison recorded it: evaluated again, not taken as done
    info = json.loads((cell / "cell.json").read_text())
    (cell / "cell.json").write_text(json.dumps({**info, "status": "running"}))
    assert cell_status(plan, cells["head-only-s1"]) == "trained"
    run_comparison(compared["spec"], compared["out"], only=["head-only-s1"])
    assert json.loads((cell / "cell.json").read_text())["status"] == "done"


def test_changed_spec_refuses_to_mix_results(compared):
    with pytest.raises(CxrError, match="trained with a different recipe .*stages.0.lr"):
        run_comparison(compared["spec"], compared["out"], overrides=["stages.0.lr=0.5"])


def _app():
    app = typer.Typer()
    app.command()(compare)
    return app


def test_dry_run_lists_cells_and_trains_nothing(compared, tmp_path):
    result = CliRunner().invoke(_app(), [str(compared["spec"]), "--dry-run", "--out", str(tmp_path / "none")])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == CELLS
    assert not (tmp_path / "none").exists()
    result = CliRunner().invoke(_app(), [str(compared["spec"]), "--dry-run", "--only", "s1"])
    assert result.stdout.split() == ["head-only-s1", "two-stage-s1"]
    result = CliRunner().invoke(_app(), [str(compared["spec"]), "--dry-run", "--set", "stages.1.epochs=2"])
    assert result.exit_code == 0, result.output
    assert "note: cell head-only-s0 has 1 stage(s), so it skips --set stages.1.epochs=2" in " ".join(
        result.stderr.split())
    narrow = CliRunner(env={"COLUMNS": "52"}).invoke(_app(), [str(compared["spec"]), "--dry-run"])
    assert narrow.exit_code == 0, narrow.output
    lines = narrow.stderr.splitlines()
    assert "strategy" not in narrow.stderr and max(map(len, lines)) <= 52  # the axes went; the id names them
    assert any("two-stage-s1" in line and "head x1, all x1" in line for line in lines)  # values whole


def test_dry_run_shows_a_cell_trained_with_another_recipe(compared):
    """--dry-run used to call such a cell done; running the comparison then refused it."""
    args = [str(compared["spec"]), "--out", str(compared["out"]), "--set", "stages.0.lr=0.5"]
    dry = CliRunner().invoke(_app(), [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    statuses = {line.split()[1]: line for line in dry.stderr.splitlines() if line.split()[1:2] in (
        [c] for c in CELLS)}
    assert set(statuses) == set(CELLS)
    assert all("recipe changed" in line and "done" not in line for line in statuses.values()), dry.stderr
    refused = CliRunner().invoke(_app(), [*args, "--only", "no-such-cell"])  # never trains, whatever happens
    assert refused.exit_code != 0 and "trained with a different recipe (stages.0.lr" in str(refused.exception)
    same = CliRunner().invoke(_app(), [*args[:3], "--dry-run", "--set", "runtime.workers=0"])
    assert "recipe changed" not in same.stderr and "done" in same.stderr  # how a run executes is no change


def test_failing_cell_is_reported_and_the_others_run(data, tmp_path):
    # a layer name is only checked against the built model, so this cell fails at run time (an unknown backbone
    # is refused with the spec, before anything trains)
    matrix = {"strategy": {"nolayer": ["stages.0.trainable=from:no_such_layer"], "all": ["stages.0.trainable=all"]}}
    spec = write_spec(tmp_path / "specs", data, name="failing", matrix=matrix)
    result = CliRunner().invoke(_app(), [str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    leaderboard = result.stdout.strip().splitlines()[-1]
    rows = {r["cell"]: r for r in csv.DictReader(open(leaderboard))}
    assert rows["nolayer"]["status"] == "failed"
    assert "has no layer named 'no_such_layer'" in rows["nolayer"]["error"]
    assert rows["all"]["status"] == "done" and rows["all"]["test_auc"]
    assert list(rows) == ["all", "nolayer"]  # finished cells first
    assert "no_such_layer" in (tmp_path / "out" / "failing" / "leaderboard.html").read_text()


def test_cells_that_fail_before_their_run_is_made_are_failed_not_new(data, tmp_path):
    """A missing data root fails each cell before its recipe.yaml is written: the leaderboard called them new and
    the command ended with 0. Once the data is there, running the comparison again trains them."""
    later = tmp_path / "later"
    spec = write_spec(tmp_path / "specs", later, name="later")
    result = CliRunner().invoke(_app(), [str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    rows = list(csv.DictReader(open(result.stdout.strip().splitlines()[-1])))
    assert rows and all(r["status"] == "failed" and f"data root {later} does not exist" in r["error"] for r in rows)
    later.symlink_to(data)
    again = CliRunner().invoke(_app(), [str(spec), "--out", str(tmp_path / "out")])
    assert again.exit_code == 0, again.output
    assert all(r["status"] == "done" for r in csv.DictReader(open(again.stdout.strip().splitlines()[-1])))


def test_confidence_intervals_and_formats():
    scores = evaluation_scores({"accuracy": 0.9, "f1_macro": 0.8, "auc": 0.95, "n": 40,
                                "ci95": {"accuracy": [0.85, 0.94], "auc": None, "method": {}}}, "test")
    assert scores["test_accuracy_ci95_low"] == 0.85 and "test_auc_ci95_low" not in scores
    assert Column("test_accuracy", "ci", "ci").text(scores) == "0.850–0.940"
    assert [format_duration(s) for s in (42, 725, 10_920)] == ["42s", "12m 05s", "3h 02m"]


def test_the_printed_table_keeps_its_numbers_in_80_columns(compared):
    """Rich squeezed every column of a wide leaderboard to nothing in an 80-column pipe; columns now go instead."""
    import io

    from rich.console import Console

    from cxrkit.compare.leaderboard import write_leaderboard

    plan = plan_comparison(compared["spec"], compared["out"])
    rows = list(csv.DictReader(compared["leaderboard"].open()))
    printed = {}
    for width in (80, 300):
        console = Console(width=width, file=io.StringIO(), color_system=None)
        write_leaderboard(plan, console)
        printed[width] = console.file.getvalue()
        assert max(map(len, printed[width].splitlines())) <= width
        for row in rows:  # every cell's line shows its test AUC, the sort column
            line = next(line for line in printed[width].splitlines() if f" {row['cell']} " in line)
            assert f"{float(row['test_auc']):.4f}" in line, (width, line)
    assert "more column(s) in" in printed[80] and "test acc" in printed[300] and "more column(s)" not in printed[300]
    assert "trainable / total" not in printed[80] and "trainable / total" in " ".join(printed[300].split())


@pytest.fixture
def one_cell(data, tmp_path):
    """A planned comparison's first cell, whose training and evaluation (train_cell) each test fakes."""
    import io

    from rich.console import Console

    plan = plan_comparison(write_spec(tmp_path / "specs", data), tmp_path / "out")
    console = Console(file=io.StringIO(), width=200, color_system=None)
    return plan, plan.cells[0], console


def test_a_cell_redone_after_a_failure_keeps_no_stale_traceback(one_cell, monkeypatch):
    from cxrkit.compare import runner

    plan, cell, console = one_cell
    error = plan.cell_dir(cell) / "error.txt"

    def crashes(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "train_cell", crashes)
    assert runner.run_cell(plan, cell, console) == "failed"
    assert "RuntimeError: boom" in error.read_text()
    monkeypatch.setattr(runner, "train_cell", lambda *args: None)
    assert runner.run_cell(plan, cell, console) == "done"
    assert not error.exists() and runner.read_cell_info(plan.cell_dir(cell))["error"] is None


def test_a_traceback_that_cannot_be_written_does_not_replace_the_cell_s_error(one_cell, monkeypatch):
    """On a disk full to the byte, writing error.txt raised and the comparison stopped with an error about it."""
    import errno
    import io
    import os

    from cxrkit.compare import runner

    plan, cell, console = one_cell
    real_open = io.open

    def full_for_error_txt(file, *args, **kwargs):  # Path.write_text and the atomic write's os.fdopen both open here
        name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else str(file)
        if "error.txt" in os.path.basename(name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, *args, **kwargs)

    def crashes(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "train_cell", crashes)
    monkeypatch.setattr(io, "open", full_for_error_txt)
    assert runner.run_cell(plan, cell, console) == "failed"
    assert runner.read_cell_info(plan.cell_dir(cell))["error"] == "RuntimeError: boom"
    printed = " ".join(console.file.getvalue().split())
    assert f"note: the traceback was not saved: {plan.cell_dir(cell) / 'error.txt'}: cannot write (No space" in printed
    assert sorted(p.name for p in plan.cell_dir(cell).iterdir()) == ["cell.json"]  # no temporary file left
