"""The HTML report of a tiny trained and evaluated run: every section, embedded figures, no external assets."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from synth import kermany_folder
from typer.testing import CliRunner

from cxrkit.errors import CxrError
from cxrkit.eval.metrics import compute_metrics
from cxrkit.eval.report import SECTIONS, build_report
from cxrkit.runs import atomic_write_json, atomic_write_text, csv_text

TINY = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--set", "model.image_size=32",
        "--set", "runtime.workers=0", "--set", "runtime.batch_size=8", "--epochs", "1",
        "--set", "stages.1.trainable=all", "--set", "stages.1.epochs=1", "--set", "data.split.ratios=[0.5,0.25,0.25]"]
EVIL = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    """A run trained for one epoch per stage at 32 px and evaluated on its test split."""
    from cxrkit.cli.main import app

    data = kermany_folder(tmp_path_factory.mktemp("xray"), per_class=12, size=32)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path_factory.mktemp("runs")), *TINY])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    result = runner.invoke(app, ["evaluate", str(run), "--split", "test", "--name", "test"])
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def run(evaluated, tmp_path) -> Path:
    """A private copy of the evaluated run, free to change."""
    return Path(shutil.copytree(evaluated, tmp_path / evaluated.name))


def _section_ids(page: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', page)


def test_report_has_every_section_and_embeds_its_figures(run):
    for png in (run / "eval" / "test").glob("*.png"):
        png.unlink()  # the report draws the figures it lacks
    path = build_report(run)
    assert path == run / "eval" / "test" / "report.html"
    page = path.read_text()
    assert _section_ids(page) == [sid for sid, _ in SECTIONS] == [
        "summary", "recipe", "data", "metrics", "figures", "environment"]
    images = re.findall(r'<img src="([^"]*)"', page)
    assert len(images) == 6  # training curves, ROC, PR, confusion, output distribution, reliability
    assert all(src.startswith("data:image/png;base64,iVBORw0KGgo") for src in images)  # the PNG signature
    for name in ("training_curves", "roc", "pr", "confusion", "output_distribution", "reliability"):
        assert (run / "eval" / "test" / f"{name}.png").is_file(), name
    assert not re.search(r'(?:src|href)\s*=\s*["\']?\s*(?:https?:)?//', page, re.IGNORECASE)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "mobilenet_v3_small" in page and "Split grouped by patient" in page
    labels = json.loads((run / "labels.json").read_text())["labels"]
    assert all(f"<td>{label}</td>" in page for label in labels)  # per class and confusion tables


def _summary_facts(page: str) -> dict[str, str]:
    summary = page.split('<section id="summary"', 1)[1].split("</section>", 1)[0]
    return dict(re.findall(r"<tr><th>([^<]*)</th><td>([^<]*)</td></tr>", summary))


def test_the_summary_gives_the_calibration_the_evaluation_used(run):
    """A calibration after the evaluation (here one without a temperature) changes labels.json, not the evaluated
    numbers: the summary gives the temperature and threshold behind them, and the engine and checkpoint."""
    from cxrkit.cli.main import app

    used = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert used["temperature"] != 1.0
    result = CliRunner().invoke(app, ["calibrate", str(run), "--no-temperature"])
    assert result.exit_code == 0, result.output
    labels = json.loads((run / "labels.json").read_text())
    assert labels["temperature"] == 1.0
    facts = _summary_facts(build_report(run).read_text())
    assert float(facts["temperature"]) == pytest.approx(used["temperature"], rel=1e-3)
    assert float(facts["threshold"]) == pytest.approx(used["threshold"], rel=1e-3)
    assert facts["evaluated with"] == "engine torch, checkpoint best"


def test_report_before_any_evaluation_goes_in_the_run(run):
    shutil.rmtree(run / "eval")
    path = build_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    assert _section_ids(page) == [sid for sid, _ in SECTIONS]
    assert "No evaluation yet" in page
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 1  # the training curves


def test_damaged_figures_are_drawn_again_and_a_damaged_run_is_refused(run):
    """A figure file that is not a PNG was embedded as one (newer than its sources, it was never redrawn); a stale
    training-curves figure stood in for a missing metrics.csv; a run without labels.json got a report of n/a."""
    evaluation = run / "eval" / "test"
    build_report(run)
    (evaluation / "roc.png").write_text("notpng")
    (evaluation / "extra.png").write_text("notpng either")  # not cxrkit's: left alone, and not embedded
    page = build_report(run).read_text()
    assert (evaluation / "roc.png").read_bytes().startswith(b"\x89PNG")
    images = re.findall(r'<img src="([^"]*)"', page)
    assert len(images) == 6 and all(src.startswith("data:image/png;base64,iVBORw0KGgo") for src in images)
    (run / "metrics.csv").unlink()
    assert len(re.findall(r'<img src="', build_report(run).read_text())) == 5  # no curves without a history
    for name in ("labels.json", "data.json"):
        broken = Path(shutil.copytree(run, run.parent / f"no-{name}"))
        (broken / name).unlink()
        with pytest.raises(CxrError, match=f"has no {name}"):
            build_report(broken)


def test_unknown_evaluation_is_a_clear_error(run):
    with pytest.raises(CxrError, match="no evaluation 'nope'.*test"):
        build_report(run, "nope")
    (run / "eval" / "stopped").mkdir()  # an evaluation killed before its metrics.json (written last)
    try:
        with pytest.raises(CxrError, match=r"evaluation 'stopped' did not finish \(it has no metrics.json\); run "
                                           r"`cxr evaluate .* --name stopped`"):
            build_report(run, "stopped")
    finally:
        (run / "eval" / "stopped").rmdir()
    with pytest.raises(CxrError, match="not a cxrkit run"):
        build_report(run / "eval")


def test_labels_and_texts_are_escaped(run):
    """A label named like a script tag shows as text in every table and never becomes markup."""
    _rename_label(run, "PNEUMONIA", EVIL)
    page = build_report(run, "test").read_text()
    assert EVIL not in page and "<script" not in page.lower()
    assert page.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;") >= 4  # summary, data, per class, matrix


def test_multilabel_evaluation_from_predictions(run):
    """A multilabel evaluation (written here by hand) gets per-label tables, a 2x2 grid and CIs when present."""
    labels = ["Effusion", "Mass"]
    rng = np.random.default_rng(0)
    y = (rng.random((40, 2)) < 0.5).astype(float)
    p = np.clip(0.6 * y + 0.4 * rng.random((40, 2)), 0, 1)
    metrics = {**compute_metrics("multilabel", labels, y, p), "dataset": "nih", "split": "test", "patients": 40,
               "ci95": {"accuracy": [0.61, 0.82], "auc": None, "method": {"interval": "percentile", "n_boot": 9}}}
    out = run / "eval" / "nih"
    atomic_write_json(out / "metrics.json", metrics)
    rows = [{"source": f"{i}.png", "patient": str(i), "true": "|".join(n for n, v in zip(labels, t) if v),
             "predicted": "", **{f"p_{n}": q for n, q in zip(labels, probs)}} for i, (t, probs) in enumerate(zip(y, p))]
    atomic_write_text(out / "predictions.csv", csv_text(rows))
    page = build_report(run, "nih").read_text()
    assert "0.610 – 0.820" in page and "percentile bootstrap, 9 resamples" in page
    assert "<th>TN</th>" in page and "<td>Effusion</td>" in page
    assert (out / "confusion.png").is_file() and (out / "roc.png").is_file()


def test_report_command_prints_the_path_last(evaluated, tmp_path):
    import typer

    from cxrkit.cli.report import report

    app = typer.Typer()
    app.command()(report)
    run = Path(shutil.copytree(evaluated, tmp_path / "run"))
    result = CliRunner().invoke(app, [str(run), "--eval", "test"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(run / "eval" / "test" / "report.html")


def _rename_label(run: Path, old: str, new: str) -> None:
    """Renames a label everywhere in a run: labels.json, data.json, metrics.json and predictions.csv."""
    for name in ("labels.json", "data.json", "eval/test/metrics.json"):
        text = (run / name).read_text()
        (run / name).write_text(text.replace(json.dumps(old), json.dumps(new)))
    path = run / "eval" / "test" / "predictions.csv"
    with path.open(newline="") as fh:
        rows = [{k.replace(f"p_{old}", f"p_{new}"): (new if v == old else v) for k, v in row.items()}
                for row in csv.DictReader(fh)]
    path.write_text(csv_text(rows))


def test_a_relative_run_path_gives_the_same_report(run, monkeypatch):
    """``cxr train`` prints a relative run path when ``--out`` is relative: the report must read the same metrics."""
    absolute = build_report(run).read_text()
    monkeypatch.chdir(run.parent)
    relative = build_report(Path(run.name)).read_text()
    assert "Accuracy" in relative and relative == absolute


def test_open_without_a_browser_says_so_and_still_prints_the_path(evaluated, tmp_path, monkeypatch):
    import webbrowser

    import typer

    from cxrkit.cli.report import report

    monkeypatch.setenv("BROWSER", str(tmp_path / "no-such-browser"))
    monkeypatch.setattr(webbrowser, "_tryorder", None)  # read $BROWSER again
    app = typer.Typer()
    app.command()(report)
    run = Path(shutil.copytree(evaluated, tmp_path / "run"))
    result = CliRunner().invoke(app, [str(run), "--eval", "test", "--open"])
    assert result.exit_code == 0, result.output
    path = run / "eval" / "test" / "report.html"
    assert result.stdout.strip().splitlines()[-1] == str(path)
    assert f"note: no web browser could be started here; open {path} yourself" in " ".join(result.stderr.split())
