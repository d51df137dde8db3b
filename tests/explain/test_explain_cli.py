"""``cxr explain`` end to end on tiny runs: files (with a bad one, and resuming), the grid, and multi-label."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synth import kermany_folder, nih_csv
from typer.testing import CliRunner

from cxrkit.cli.main import app

TINY = ["--backbone", "resnet18", "--weights", "none", "--set", "model.image_size=64", "--set",
        "runtime.batch_size=8", "--set", "runtime.workers=0", "--epochs", "1"]


def _train(out: Path, *args: str) -> Path:
    result = CliRunner().invoke(app, ["train", "--out", str(out), *TINY, *args])
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return kermany_folder(tmp_path_factory.mktemp("xray"), per_class=16, size=64)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("runs"), "--data", str(data))


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_files_give_overlays_raw_maps_and_a_check(run, data, tmp_path):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 150), dtype=np.uint8)).save(wide)
    bad = tmp_path / "broken.jpeg"
    bad.write_text("not an image")
    blank = tmp_path / "blank.png"  # refused as cxr predict refuses it; it used to get a heatmap
    Image.new("L", (64, 64), 128).save(blank)
    pneumonia = sorted((data / "train" / "PNEUMONIA").iterdir())[0]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explain", str(run), str(pneumonia), str(wide), str(bad), str(blank), "--out",
                                      str(out)])
    assert result.exit_code == 1  # the bad files fail the command, after the others are done
    assert "broken.jpeg" in result.output and "2 of 4 files could not be explained" in result.output
    assert "blank.png: blank image (every pixel is 128 of 255): nothing to classify" in " ".join(result.output.split())
    rows = _rows(out / "explain.csv")
    assert [Path(r["source"]).name for r in rows] == [pneumonia.name, "wide.png"]
    for row in rows:
        heat = np.load(out / row["npy"])
        assert heat.shape == (64, 64) and heat.dtype == np.float32 and 0 <= heat.min() <= heat.max() <= 1
        png = Image.open(out / row["png"])
        assert png.format == "PNG" and png.width > 300
        assert row["verdict"] in ("meaningful", "inconclusive", "no better than random")
        assert float(row["score"]) == pytest.approx(float(row["drop_heatmap"]) - float(row["drop_random"]), abs=2e-6)
    record = json.loads((out / "wide.json").read_text())
    assert record["box"] == [0, 0, 150, 60]  # squashed input: the map covers the whole original image
    assert record["rows"][0]["target"] == record["predicted"]  # default: the predicted class
    assert sum(record["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    wide_png = Image.open(out / record["rows"][0]["png"])
    assert wide_png.width > wide_png.height  # drawn at the original aspect ratio

    before = (out / "wide.json").stat().st_mtime_ns
    again = CliRunner().invoke(app, ["explain", str(run), str(pneumonia), str(wide), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "2 images were already explained" in again.output
    assert (out / "wide.json").stat().st_mtime_ns == before
    assert len(_rows(out / "explain.csv")) == 2


def test_resuming_follows_the_settings_and_the_file_and_explain_csv_covers_the_folder(run, data, tmp_path):
    """An image was skipped when a .json of its name existed, whatever the settings or the file behind the name,
    and explain.csv held only the last call's rows."""
    normal = sorted((data / "train" / "NORMAL").iterdir())[0]
    out = tmp_path / "out"

    def explain(*args):
        result = CliRunner().invoke(app, ["explain", str(run), *args, "--out", str(out), "--no-check"])
        return result, {(Path(r["source"]).name, r["target"]) for r in _rows(out / "explain.csv")}

    result, rows = explain(str(normal))
    assert result.exit_code == 0, result.output
    assert "1 heatmap (no faithfulness check)" in result.output
    predicted = json.loads((out / f"{normal.stem}.json").read_text())["predicted"]
    result, rows = explain(str(normal), "-t", "all")
    assert "1 image explained before with other settings" in result.output
    assert rows == {(normal.name, "NORMAL"), (normal.name, "PNEUMONIA")}
    result, rows = explain(str(normal))  # back to the predicted class: the other class's files go
    assert rows == {(normal.name, predicted)}
    other = "PNEUMONIA" if predicted == "NORMAL" else "NORMAL"
    assert not (out / f"{normal.stem}.{other}.png").exists() and not (out / f"{normal.stem}.{other}.npy").exists()
    result, rows = explain(str(normal))
    assert "1 image was already explained" in result.output

    for folder, value in (("in1", 10), ("in2", 180)):  # two files of one name, explained in two calls
        (tmp_path / folder).mkdir()
        ramp = value + np.add.outer(np.arange(64), np.arange(64)) // 2  # not blank, which explain refuses
        Image.fromarray(ramp.astype(np.uint8)).save(tmp_path / folder / "same.png")
    explain(str(tmp_path / "in1" / "same.png"))
    result, rows = explain(str(tmp_path / "in2" / "same.png"))
    assert "already explained" not in result.output
    assert json.loads((out / "same.json").read_text())["source"] == str(tmp_path / "in1" / "same.png")
    assert json.loads((out / "same-2.json").read_text())["source"] == str(tmp_path / "in2" / "same.png")
    assert len(rows) == 3 and sum(name == "same.png" for name, _ in rows) == 2
    result, rows = explain(str(tmp_path / "missing.png"))  # a call where every file fails keeps the summary
    assert result.exit_code != 0 and len(rows) == 3


def test_images_checked_under_an_earlier_verdict_rule_are_explained_again(run, data, tmp_path):
    normal = sorted((data / "train" / "NORMAL").iterdir())[0]
    out = tmp_path / "out"
    first = CliRunner().invoke(app, ["explain", str(run), str(normal), "--out", str(out)])
    assert first.exit_code == 0, first.output
    record = json.loads((out / f"{normal.stem}.json").read_text())
    del record["settings"]["verdicts"]  # as written before the rule asked the heatmap's own drop to reach 0.01
    (out / f"{normal.stem}.json").write_text(json.dumps(record))
    again = CliRunner().invoke(app, ["explain", str(run), str(normal), "--out", str(out)])
    assert "1 image explained before with other settings" in again.output
    record = json.loads((out / f"{normal.stem}.json").read_text())  # as the rerun wrote it: with the new rule
    del record["settings"]["check_seeding"]  # as written when the check's random regions were seeded per batch
    (out / f"{normal.stem}.json").write_text(json.dumps(record))
    again = CliRunner().invoke(app, ["explain", str(run), str(normal), "--out", str(out)])
    assert "1 image explained before with other settings" in again.output


def test_every_class_and_another_method(run, data, tmp_path):
    image = sorted((data / "train" / "NORMAL").iterdir())[0]
    out = tmp_path / "all"
    result = CliRunner().invoke(app, ["explain", str(run), str(image), "--target", "all", "--method", "gradcam++",
                                      "--no-check", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = _rows(out / "explain.csv")
    assert [r["target"] for r in rows] == ["NORMAL", "PNEUMONIA"]
    assert all(r["verdict"] == "" for r in rows)
    assert json.loads((out / f"{image.stem}.json").read_text())["method"] == "Grad-CAM++"


def test_grid_has_every_cell_of_the_confusion_matrix(run, tmp_path):
    out = tmp_path / "grid"
    result = CliRunner().invoke(app, ["explain", str(run), "--grid", "--split", "test", "--per-cell", "2",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    (png,) = out.glob("grid-*-test-gradcam.png")
    table = png.with_suffix(".csv")
    assert Image.open(png).format == "PNG" and str(png) in result.output
    rows = _rows(table)
    predictions = _rows(_evaluate(run) / "predictions.csv")
    for (true, predicted) in {(r["true"], r["predicted"]) for r in predictions}:
        members = [r for r in rows if r["true"] == true and r["predicted"] == predicted]
        expected = min(2, sum(p["true"] == true and p["predicted"] == predicted for p in predictions))
        assert len(members) == expected, (true, predicted)
    assert all(r["explained"] == r["predicted"] for r in rows)


def _evaluate(run: Path) -> Path:
    result = CliRunner().invoke(app, ["evaluate", str(run), "--split", "test", "--name", "grid-check"])
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1]).parent


def test_bad_requests_are_one_line_errors(run, tmp_path):
    for args, message in (
        ([], "give images to explain, or --grid"),
        (["--grid", "x.png"], "give images to explain, or --grid"),
        (["x.png", "--method", "gradkam"], "unknown CAM method"),
        (["x.png", "--layer", "layr4"], "did you mean backbone.layer4"),
        (["--grid", "--split", "holdout"], "no holdout split"),
        (["x.png", "--remove", "0"], "--remove 0 must be above 0 and below 100 (percent)"),
        (["x.png", "--opacity", "2"], "--opacity 2 must be from 0 to 1"),
        (["x.png", "--random-maps", "0"], "--random-maps 0 must be at least 1"),
        (["x.png", "--per-cell", "2", "--pick", "random"], "--per-cell, --pick are for --grid"),  # were ignored
        (["x.png", "--split", "test"], "--split is for --grid"),
        (["--grid", "--overwrite"], "--overwrite is for images, not --grid"),
    ):
        result = CliRunner().invoke(app, ["explain", str(run), *args, "--out", str(tmp_path)])
        assert result.exit_code != 0
        assert message in str(result.exception) + result.output, (args, result.output)
    (tmp_path / "afile").write_text("keep")
    result = CliRunner().invoke(app, ["explain", str(run), "x.png", "--out", str(tmp_path / "afile")])
    assert str(result.exception) == f"--out {tmp_path / 'afile'} is a file, not a folder"


def test_classes_whose_file_names_come_out_the_same_get_their_own_files(tmp_path):
    """Classes 病毒 and 肺炎 are both ``x`` as file names: the second class's heatmap replaced the first's."""
    root = kermany_folder(tmp_path / "data", per_class=8, size=64)
    for old, new in (("NORMAL", "病毒"), ("PNEUMONIA", "肺炎")):
        (root / "train" / old).rename(root / "train" / new)
    run = _train(tmp_path / "runs", "--data", str(root))
    image = sorted((root / "train" / "病毒").iterdir())[0]
    result = CliRunner().invoke(app, ["explain", str(run), str(image), "--target", "all", "--no-check", "--out",
                                      str(tmp_path / "ex")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "ex").glob("*.npy")) == [f"{image.stem}.x-2.npy", f"{image.stem}.x.npy"]
    assert not np.array_equal(np.load(tmp_path / "ex" / f"{image.stem}.x.npy"),
                              np.load(tmp_path / "ex" / f"{image.stem}.x-2.npy"))


def test_multilabel_explains_each_label(tmp_path):
    run = _train(tmp_path / "runs", "--data", str(nih_csv(tmp_path / "nih", n=40, size=64)), "--task",
                 "multilabel")
    image = tmp_path / "nih" / "images" / "00000001_000.png"
    out = tmp_path / "ml"
    result = CliRunner().invoke(app, ["explain", str(run), str(image), "-t", "Effusion", "-t", "Atelectasis",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["target"] for r in _rows(out / "explain.csv")] == ["Effusion", "Atelectasis"]
    result = CliRunner().invoke(app, ["explain", str(run), "--grid", "--split", "test", "-t", "Effusion",
                                      "--per-cell", "1", "--no-check", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (table,) = out.glob("grid-*-test-gradcam-Effusion.csv")
    rows = _rows(table)
    assert rows and {r["true"] for r in rows} <= {"absent", "present"} and {r["explained"] for r in rows} == {
        "Effusion"}


def test_an_output_folder_that_cannot_be_made_is_a_one_line_error(run, data, tmp_path, monkeypatch, capsys):
    import sys

    from cxrkit.cli.main import main

    (tmp_path / "file").write_text("keep")
    image = next((data / "train" / "NORMAL").glob("*.jpeg"))
    monkeypatch.setattr(sys, "argv", ["cxr", "explain", str(run), str(image), "--out", str(tmp_path / "file" / "x")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err == f"error: {tmp_path / 'file' / 'x'}: Not a directory"
    assert (tmp_path / "file").read_text() == "keep"


def test_a_stopped_run_keeps_its_summary_and_the_next_removes_a_killed_runs_temporary_files(run, data, tmp_path,
                                                                                           monkeypatch):
    """explain.csv was written only at the end, so after Ctrl-C it left out the images already explained; and the
    temporary files of a run killed while writing stayed in the folder after later runs."""
    import os
    import subprocess
    import sys

    from cxrkit.explain import api
    from cxrkit.explain.api import explain_files
    from cxrkit.serve.predictor import Predictor

    images = sorted((data / "train" / "NORMAL").iterdir())[:3]
    out = tmp_path / "out"
    out.mkdir()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    leftover, live = out / f".a.json.{dead}.x1y2.tmp", out / f".b.json.{os.getpid()}.z3.tmp"
    leftover.write_text("{")
    live.write_text("{")
    written, real = [], api.atomic_write_json

    def stop_after_two(path, obj):
        if len(written) == 2:
            raise KeyboardInterrupt
        real(path, obj)
        written.append(path)

    monkeypatch.setattr(api, "atomic_write_json", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        explain_files(Predictor(run), [str(p) for p in images], out, api.ExplainOptions(batch_size=1))
    assert not leftover.exists() and live.exists()
    assert sorted(r["source"] for r in _rows(out / "explain.csv")) == sorted(str(p) for p in images[:2])
