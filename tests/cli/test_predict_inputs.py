"""``cxr predict`` over every bad or unusual input kind, folders and globs, and its output fields."""

import csv
import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from badinputs import CASES, write_cases
from typer.testing import CliRunner

from cxrkit.cli.main import app


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return write_cases(tmp_path_factory.mktemp("bad"))


def test_every_case_in_a_folder_is_predicted_or_explained(tiny_run, cases):
    folder = next(iter(cases.values())).parent
    result = CliRunner().invoke(app, ["predict", str(tiny_run), str(folder), "--format", "json"])
    assert result.exit_code == 1  # some files failed
    rows = {r["source"]: r for r in json.loads(result.stdout)}
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    for case, (_, expected) in CASES.items():
        row = rows[str(cases[case])]
        if expected == "ok":
            assert row["error"] is None and row["label"] in ("NORMAL", "PNEUMONIA"), case
            assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        else:
            assert row["label"] is None and re.search(expected, row["error"]), (case, row["error"])
            assert any(re.search(expected, line) for line in errors), case
    failed = sum(expected != "ok" for _, expected in CASES.values())
    assert f"{failed} of {len(CASES)} files could not be predicted" in result.stderr
    one, two = rows[str(cases["dicom-mono1"])], rows[str(cases["dicom-mono2"])]
    assert one["probabilities"] == pytest.approx(two["probabilities"], abs=1e-6)


def test_json_and_csv_carry_the_service_fields(tiny_run, cases):
    path = str(cases["rgba-png"])
    result = CliRunner().invoke(app, ["predict", str(tiny_run), path, "--format", "json"])
    (row,) = json.loads(result.stdout)
    assert set(row) == {"source", "label", "probabilities", "threshold", "exceeded", "model", "timing_ms", "error"}
    assert set(row["model"]) == {"run", "backbone", "checkpoint", "weights_sha256", "engine"}
    assert row["exceeded"] == (row["probabilities"]["PNEUMONIA"] >= row["threshold"])
    result = CliRunner().invoke(app, ["predict", str(tiny_run), path, str(cases["text"]), "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["source"] for r in rows] == [path, str(cases["text"])]
    assert rows[0]["model_weights_sha256"] == row["model"]["weights_sha256"] and rows[1]["error"]
    assert float(rows[0]["p_PNEUMONIA"]) == pytest.approx(row["probabilities"]["PNEUMONIA"], abs=1e-6)


def test_glob_patterns_and_an_unmatched_pattern(tiny_run, cases):
    folder = cases["rgba-png"].parent
    result = CliRunner().invoke(app, ["predict", str(tiny_run), str(folder / "*.png"), "--format", "json"])
    sources = {r["source"] for r in json.loads(result.stdout)}
    assert sources == {str(p) for p in folder.glob("*.png")}
    result = CliRunner().invoke(app, ["predict", str(tiny_run), str(folder / "*.nothing")])
    assert result.exit_code != 0 and "no file matches" in str(result.exception)
    first = min(folder.glob("*.png"))
    again = [str(first), str(folder / "." / first.name), str(folder / "*.png")]  # one file, named three ways
    result = CliRunner().invoke(app, ["predict", str(tiny_run), *again, "--format", "json"])
    sources = [r["source"] for r in json.loads(result.stdout)]
    assert sources[0] == str(first) and sorted(sources) == sorted({str(p) for p in folder.glob("*.png")})
    result = CliRunner().invoke(app, ["predict", str(tiny_run), str(first), "--batch-size", "0"])
    assert result.exit_code == 2 and "--batch-size" in result.output


def test_an_existing_file_whose_name_looks_like_a_pattern_is_that_file(tiny_run, cases, tmp_path):
    """``a[1].png`` was read as a pattern: it predicted ``a1.png`` in its place, or found no match."""
    literal, other = tmp_path / "a[1].png", tmp_path / "a1.png"
    shutil.copy(cases["rgba-png"], literal)
    shutil.copy(cases["palette-png"], other)
    result = CliRunner().invoke(app, ["predict", str(tiny_run), str(literal), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [r["source"] for r in json.loads(result.stdout)] == [str(literal)]


def test_files_whose_names_outputs_cannot_hold_are_reported_and_the_rest_written(tiny_run, cases, tmp_path):
    """A file name that is not UTF-8 made `-o out.csv` fail after every image was predicted, with nothing written;
    a carriage return in a name split its CSV row in two."""
    import os

    folder = tmp_path / "names"
    folder.mkdir()
    for name in ("plain.png", os.fsdecode(b"bad\xff.png"), "cr\rx.png"):
        shutil.copy(cases["rgba-png"], folder / name)
    result = CliRunner().invoke(app, ["predict", str(tiny_run), str(folder), "-o", str(tmp_path / "out.csv")])
    assert result.exit_code == 1
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out.csv").read_text(encoding="utf-8"))))
    assert {r["source"]: r["error"] for r in rows} == {
        f"{folder}/plain.png": "",
        f"{folder}/bad\\xff.png": f"{folder}/bad\\xff.png: its name is not valid UTF-8; rename it",
        f"{folder}/cr\\rx.png": f"{folder}/cr\\rx.png: its name holds a control character; rename it",
    }
    assert f"error: {folder}/bad\\xff.png: its name is not valid UTF-8; rename it" in result.stderr


def test_multiframe_dicom_is_refused_with_a_clear_message(tiny_run, tmp_path):
    from data.helpers import write_dicom

    frames = write_dicom(tmp_path / "cine.dcm", np.zeros((3, 16, 16), np.uint16), NumberOfFrames=3)
    result = CliRunner().invoke(app, ["predict", str(tiny_run), str(frames), "--format", "json"])
    assert result.exit_code == 1
    assert "cine.dcm: multi-frame DICOM (3 frames) is not supported" in result.stderr


def test_an_existing_output_file_survives_a_run_that_cannot_start(tiny_run, tmp_path):
    out = tmp_path / "predictions.csv"
    out.write_text("earlier results\n")
    result = CliRunner().invoke(app, ["predict", str(tiny_run), str(tmp_path / "*.none"), "-o", str(out)])
    assert result.exit_code != 0 and out.read_text() == "earlier results\n"


def test_the_output_file_s_suffix_chooses_the_format(tiny_run, cases, tmp_path):
    """-o x.json used to get CSV unless --format json was given as well."""
    image = str(cases["rgba-png"])
    for name, first in (("p.json", "["), ("p.csv", "source,"), ("p.txt", "source,")):
        result = CliRunner().invoke(app, ["predict", str(tiny_run), image, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert (tmp_path / name).read_text().startswith(first), name
    assert json.loads((tmp_path / "p.json").read_text())[0]["source"] == image
    result = CliRunner().invoke(app, ["predict", str(tiny_run), image, "-o", str(tmp_path / "q.json"),
                                      "--format", "csv"])
    assert result.exit_code != 0 and "names json but --format is csv" in str(result.exception)
    assert not (tmp_path / "q.json").exists()


def test_an_output_that_is_an_input_or_the_run_s_own_file_is_refused(tiny_run, cases, tmp_path):
    """-o onto the image being predicted, or onto the run's checkpoint, replaced it and exited 0."""
    image = tmp_path / "victim.png"
    image.write_bytes(cases["rgba-png"].read_bytes())
    result = CliRunner().invoke(app, ["predict", str(tiny_run), str(tmp_path / "*.png"), "-o", str(image)])
    assert result.exit_code != 0 and "is one of the images to predict" in str(result.exception)
    assert image.read_bytes() == cases["rgba-png"].read_bytes()
    checkpoint = tiny_run / "checkpoints" / "best.pt"
    before = checkpoint.read_bytes()
    result = CliRunner().invoke(app, ["predict", str(tiny_run), str(image), "-o", str(checkpoint)])
    assert result.exit_code != 0 and "is a checkpoint of run" in str(result.exception)
    assert checkpoint.read_bytes() == before
    result = CliRunner().invoke(app, ["predict", str(tiny_run), str(image), "-o", "/proc/cxrkit-test.csv"])
    assert result.exit_code != 0 and "cannot write here" in str(result.exception)


def test_predict_applies_the_temperature_without_importing_scikit_learn(tiny_run, cases):
    """Predicting only applies a fitted temperature, so the metrics' libraries (scikit-learn, about 2 s to import)
    stay out of ``cxr predict`` and of the service, which predicts through the same ``Predictor``."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cxrkit.cli.main import app\n"
        "from cxrkit.serve.predictor import Predictor\n"
        f"assert Predictor({str(tiny_run)!r}).temperature != 1.0\n"
        f"result = CliRunner().invoke(app, ['predict', {str(tiny_run)!r}, {str(cases['rgba-png'])!r}])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in ('sklearn', 'scipy.optimize', 'pandas') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("terminal", [True, False])
def test_a_progress_bar_is_drawn_on_a_terminal_only(tiny_run, cases, tmp_path, monkeypatch, terminal):
    monkeypatch.setenv("TTY_COMPATIBLE", "1" if terminal else "0")  # rich: treat stderr as a terminal, or not
    paths = [str(cases[name]) for name in ("rgba-png", "cmyk-jpeg", "palette-png")]
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(app, ["predict", str(tiny_run), *paths, "--batch-size", "2", "-o", str(out),
                                      "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 1 + len(paths)
    if terminal:
        assert "predict" in result.stderr and "3/3" in result.stderr and "img/s" in result.stderr
    else:
        assert result.stderr == ""


@pytest.fixture(scope="module")
def multilabel(tiny_multilabel_run, tmp_path_factory):
    """Two copies of the 14-label run, one answering Atelectasis 0.55, Effusion 0.73 and Edema 0.90 (the rest
    0.0025), one deciding no label (Cardiomegaly 0.27 the most probable), and an image to predict."""
    from synth import with_logits, xray

    root = tmp_path_factory.mktemp("ml-predict")
    decided = with_logits(tiny_multilabel_run, root / "decided", {"Atelectasis": 0.2, "Edema": 2.2, "Effusion": 1.0})
    nothing = with_logits(tiny_multilabel_run, root / "nothing", {"Cardiomegaly": -1.0})
    image = root / "chest.png"
    xray(np.random.default_rng(1), 64, True).save(image)
    return decided, nothing, image


def test_no_decided_label_is_an_empty_label_in_json_csv_and_the_table(multilabel):
    """It was written "none", which a label may be called and which reads like ChestX-ray14's "No Finding"."""
    _, nothing, image = multilabel
    (row,) = json.loads(CliRunner().invoke(app, ["predict", str(nothing), str(image), "-f", "json"]).stdout)
    assert max(row["probabilities"].values()) < 0.5 and row["threshold"] == 0.5
    assert row["label"] == "" and row["exceeded"] is False and row["error"] is None
    result = CliRunner().invoke(app, ["predict", str(nothing), str(image), "-f", "csv"])
    (flat,) = list(csv.DictReader(io.StringIO(result.stdout)))
    assert flat["label"] == "" and flat["exceeded"] == "0"
    assert float(flat["p_Cardiomegaly"]) == pytest.approx(0.2689, abs=1e-3)
    _, decided, most_probable = _table_columns(_predict_table(nothing, image))
    assert decided == "" and most_probable.splitlines()[0] == "Cardiomegaly 0.2689"


def _predict_table(run, *args: str, columns: int = 80) -> str:
    result = CliRunner().invoke(app, ["predict", str(run), *map(str, args)], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.stdout


def _table_columns(table: str) -> list[str]:
    """The cells of a one-row rich table, each with its lines joined by newlines."""
    lines = [line.split("│")[1:-1] for line in table.splitlines() if line.startswith("│")]
    return ["\n".join(part.strip() for part in column).strip() for column in zip(*lines)]


def test_the_default_table_is_readable_with_fourteen_labels(multilabel, tiny_run, cases):
    """With a column per label, 14 findings at 80 columns showed every probability as `0…`."""
    run, _, image = multilabel
    (row,) = json.loads(CliRunner().invoke(app, ["predict", str(run), str(image), "-f", "json"]).stdout)
    p = row["probabilities"]
    table = _predict_table(run, image)
    assert "…" not in table and max(len(line) for line in table.splitlines()) <= 80
    header = next(line for line in table.splitlines() if line.startswith("┃"))
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["image", "labels at p >= 0.5", "most probable"]
    _, decided, most_probable = _table_columns(table)
    assert decided.splitlines() == row["label"].split("|") == [n for n in p if p[n] >= 0.5]
    assert most_probable.splitlines() == [f"{n} {p[n]:.4f}" for n in sorted(p, key=p.get, reverse=True)[:3]]
    # a binary run's labels fit: one column each, as before
    (binary,) = json.loads(CliRunner().invoke(app, ["predict", str(tiny_run), str(cases["rgba-png"]), "-f",
                                                    "json"]).stdout)
    cells = _table_columns(_predict_table(tiny_run, cases["rgba-png"]))
    assert cells[1:] == [binary["label"], *(f"{q:.4f}" for q in binary["probabilities"].values())]
