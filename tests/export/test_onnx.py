"""ONNX export of a trained run and the ``--engine onnx`` path of predict and evaluate."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cxrkit.cli.main import app
from cxrkit.export.onnx import read_metadata
from cxrkit.serve.predictor import Predictor
from cxrkit.train.runtime import setup_runtime


def _images(data):
    return sorted(str(p) for p in data.glob("*.png"))


def test_onnx_engine_gives_the_fp32_torch_probabilities_and_carries_the_metadata(run, data):
    fp32 = setup_runtime("cpu", "fp32", channels_last=False, workers=0)
    torch_side = list(Predictor(run, runtime=fp32).predict_files(_images(data)))
    onnx = Predictor(run, engine="onnx")
    onnx_side = list(onnx.predict_files(_images(data)))
    assert [p.label for p in onnx_side] == [p.label for p in torch_side]
    for a, b in zip(onnx_side, torch_side):
        assert list(a.probabilities.values()) == pytest.approx(list(b.probabilities.values()), abs=1e-4)
    meta = read_metadata(run / "export" / "best.onnx")
    labels = json.loads((run / "labels.json").read_text())
    assert meta["labels"] == labels["labels"] == onnx.labels
    assert meta["threshold"] == labels["threshold"] and meta["temperature"] == labels["temperature"]
    assert meta["weights_sha256"] == onnx.weights_sha256 and len(meta["weights_sha256"]) == 64
    assert meta["preprocessing"]["size"] == 48 and len(meta["preprocessing"]["mean"]) == 3
    assert meta["backbone"] == "mobilenet_v3_small" and meta["run"] == run.name


def test_the_export_is_reused_refreshed_after_calibration_and_rebuilt_for_other_weights(run, data, capsys):
    Predictor(run, engine="onnx")
    path = run / "export" / "best.onnx"
    capsys.readouterr()
    stamp = path.stat().st_mtime_ns
    Predictor(run, engine="onnx")
    assert path.stat().st_mtime_ns == stamp and "exporting" not in capsys.readouterr().err  # reused as it is

    labels_file = run / "labels.json"
    original = labels_file.read_text()
    try:
        labels = json.loads(original)
        labels["temperature"] = 2.5
        labels_file.write_text(json.dumps(labels))
        Predictor(run, engine="onnx")
        assert read_metadata(path)["temperature"] == 2.5  # metadata follows a new calibration, graph kept
        assert "exporting" not in capsys.readouterr().err
    finally:
        labels_file.write_text(original)

    last = Predictor(run, checkpoint="last", engine="onnx")  # the other checkpoint has its own file
    assert (run / "export" / "last.onnx").is_file() and last.weights_sha256 == read_metadata(
        run / "export" / "last.onnx")["weights_sha256"]

    path.write_bytes(path.read_bytes()[:1000])  # a damaged export is rebuilt, not trusted
    again = Predictor(run, engine="onnx")
    assert read_metadata(path)["weights_sha256"] == again.weights_sha256
    assert np.isfinite(next(iter(again.predict_files(_images(data)[:1]))).probabilities["NORMAL"])


def test_evaluate_with_the_onnx_engine_matches_torch_in_fp32(run):
    metrics = {}
    for engine in ("torch", "onnx"):
        result = CliRunner().invoke(app, ["evaluate", str(run), "--split", "val", "--name", engine,
                                          "--engine", engine])
        assert result.exit_code == 0, result.output
        metrics[engine] = json.loads((run / "eval" / engine / "metrics.json").read_text())
    assert metrics["onnx"]["engine"] == "onnx" and metrics["torch"]["engine"] == "torch"
    assert metrics["onnx"]["n"] == metrics["torch"]["n"]
    # the torch engine may run in bf16 where the CPU has it; ONNX Runtime is fp32
    tolerance = 1e-4 if setup_runtime().precision == "fp32" else 0.05
    assert metrics["onnx"]["auc"] == pytest.approx(metrics["torch"]["auc"], abs=tolerance)


def test_an_unknown_engine_is_a_one_line_error(run, data):
    result = CliRunner().invoke(app, ["predict", str(run), _images(data)[0], "--engine", "tensorrt"])
    assert result.exit_code != 0
    assert "engine 'tensorrt' is not one of auto, torch, onnx" in str(result.exception) + result.output


@pytest.fixture(scope="module")
def calibratable(tmp_path_factory):
    """A run with both classes in its validation split, so cxr calibrate can choose a threshold."""
    from synth import kermany_folder

    folder = tmp_path_factory.mktemp("calibratable")
    result = CliRunner().invoke(app, [
        "train", "--data", str(kermany_folder(folder / "xray", per_class=10, size=48)), "--out", str(folder),
        "--backbone", "mobilenet_v3_small", "--weights", "none", "--set", "model.image_size=48", "--epochs", "1",
        "--set", "runtime.workers=0", "--set", "data.split.ratios=[0.5,0.3,0.2]"])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    for fmt in ("onnx", "torchscript"):
        result = CliRunner().invoke(app, ["export", str(run), "-f", fmt])
        assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def own_run(calibratable, tmp_path):
    """A copy of that run, with its ONNX and TorchScript exports, for a test that changes it."""
    import shutil

    return Path(shutil.copytree(calibratable, tmp_path / calibratable.name))


def test_calibrate_brings_the_run_s_exports_up_to_date_and_notes_another_checkpoint(own_run, data):
    """`cxr calibrate` used to leave RUN/export/ with the old threshold (the ONNX file until its next use, the
    TorchScript file for good), and a calibration fitted on `last` was silently used for `best`."""
    import torch

    from cxrkit.export.torchscript import load_torchscript

    run = own_run
    for fmt in ("onnx", "torchscript", "onnx-int8"):
        result = CliRunner().invoke(app, ["export", str(run), "-f", fmt])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["calibrate", str(run), "--target-sensitivity", "1", "--no-temperature"])
    assert result.exit_code == 0, result.output
    labels = json.loads((run / "labels.json").read_text())
    assert labels["threshold_method"] == "sensitivity>=1" and labels["calibrated_checkpoint"] == "best"
    wanted = {key: labels[key] for key in ("threshold", "temperature", "threshold_method", "calibrated_checkpoint")}
    onnx = read_metadata(run / "export" / "best.onnx")
    _, scripted = load_torchscript(run / "export" / "best.torchscript.pt")
    for meta in (onnx, scripted):
        assert {key: meta[key] for key in wanted} == wanted
    follows = read_metadata(run / "export" / "best.int8.onnx")["quantization"]["calibration"]["follows"]
    assert follows["threshold"] == labels["threshold"] and follows["threshold_method"] == "sensitivity>=1"
    assert "brought the calibration of" in result.stderr and "best.torchscript.pt" in result.stderr
    assert "export them again" in result.stderr  # the threshold changed: copies elsewhere are out of date
    damaged = run / "export" / "best.torchscript.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    again = CliRunner().invoke(app, ["calibrate", str(run), "--target-sensitivity", "1", "--no-temperature"])
    assert again.exit_code == 0, again.output
    assert f"note: {damaged} cannot be read, so it keeps the old calibration" in " ".join(again.stderr.split())
    assert "export them again" not in again.stderr  # nothing changed

    last = torch.load(run / "checkpoints" / "last.pt", weights_only=False)  # make last differ from best
    last["model"] = {key: value + 0.01 if key.startswith("head") else value for key, value in last["model"].items()}
    torch.save(last, run / "checkpoints" / "last.pt")
    result = CliRunner().invoke(app, ["calibrate", str(run), "--checkpoint", "last"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "labels.json").read_text())["calibrated_checkpoint"] == "last"
    result = CliRunner().invoke(app, ["predict", str(run), _images(data)[0]])
    assert result.exit_code == 0, result.output
    assert ("note: the run's temperature and threshold were fitted on other weights (the last checkpoint as it was "
            "then), not on this best checkpoint") in " ".join(result.stderr.split())
    result = CliRunner().invoke(app, ["predict", str(run), _images(data)[0], "--checkpoint", "last"])
    assert result.exit_code == 0 and "fitted on other weights" not in result.stderr


def _calibration_of(run: Path) -> dict:
    from cxrkit.export.torchscript import load_torchscript

    _, scripted = load_torchscript(run / "export" / "best.torchscript.pt")
    return {key: scripted[key] for key in ("threshold", "temperature")}


def test_a_calibration_stopped_before_the_exports_is_finished_by_the_next_command(own_run, data, monkeypatch):
    """A kill between labels.json and RUN/export/ left the TorchScript file with the old threshold for good."""
    before = _calibration_of(own_run)

    def killed(self, console=None):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(Predictor, "refresh_exports", killed)
        stopped = CliRunner().invoke(app, ["calibrate", str(own_run), "--no-temperature"])
    assert stopped.exit_code != 0
    labels = json.loads((own_run / "labels.json").read_text())
    assert labels["temperature"] == 1.0 != before["temperature"] and _calibration_of(own_run) == before  # apart
    result = CliRunner().invoke(app, ["predict", str(own_run), _images(data)[0]])  # any command that loads the run
    assert result.exit_code == 0, result.output
    assert _calibration_of(own_run) == {key: labels[key] for key in ("threshold", "temperature")}
    assert "a cxr calibrate of this run stopped before it updated" in " ".join(result.stderr.split())
    assert not list((own_run / "export").glob(".calibration*"))
    again = CliRunner().invoke(app, ["predict", str(own_run), _images(data)[0]])
    assert again.exit_code == 0 and "stopped" not in again.stderr  # once


def test_calibrate_changes_nothing_when_the_exports_cannot_be_written(own_run, monkeypatch):
    import cxrkit.serve.predictor

    labels = (own_run / "labels.json").read_text()
    monkeypatch.setattr(cxrkit.serve.predictor, "folder_unwritable", lambda folder: "Read-only file system")
    result = CliRunner().invoke(app, ["calibrate", str(own_run), "--target-sensitivity", "1"])
    assert result.exit_code != 0
    assert str(result.exception) == (f"{own_run / 'export'}: cannot write here (Read-only file system); cxr "
                                     "calibrate updates labels.json and the files exported there together, so it "
                                     "changed nothing")
    assert (own_run / "labels.json").read_text() == labels  # it used to be rewritten before the export failed


def test_calibrate_on_a_run_that_cannot_be_written_says_so_before_predicting(own_run, monkeypatch):
    import cxrkit.runs
    from cxrkit.serve.predictor import Predictor

    monkeypatch.setattr(cxrkit.runs, "folder_unwritable", lambda folder: "Read-only file system")
    monkeypatch.setattr(Predictor, "predict_dataset", lambda *args, **kwargs: pytest.fail("predicted first"))
    result = CliRunner().invoke(app, ["calibrate", str(own_run)])
    assert result.exit_code != 0
    assert str(result.exception) == f"{own_run / 'labels.json'}: cannot write here (Read-only file system)"


def test_calibrate_whose_exports_cannot_be_updated_says_that_labels_json_changed(own_run, data, monkeypatch):
    """The disk filled between labels.json and the exports: the error said only that best.onnx could not be
    written, as if nothing had changed."""
    import cxrkit.export.onnx
    from cxrkit.errors import CxrError

    def disk_full(path, metadata):
        raise CxrError(f"{path}: cannot write (No space left on device)")

    with monkeypatch.context() as patched:
        patched.setattr(cxrkit.export.onnx, "update_metadata", disk_full)
        result = CliRunner().invoke(app, ["calibrate", str(own_run), "--no-temperature"])
    assert result.exit_code != 0
    assert str(result.exception) == (
        f"the calibration is saved in labels.json, but the files in {own_run / 'export'} were not brought up to "
        f"date: {own_run / 'export' / 'best.onnx'}: cannot write (No space left on device); the next command that "
        "loads the run finishes it (or run cxr calibrate again)")
    assert json.loads((own_run / "labels.json").read_text())["temperature"] == 1.0
    result = CliRunner().invoke(app, ["predict", str(own_run), _images(data)[0]])  # as it says
    assert result.exit_code == 0, result.output
    assert _calibration_of(own_run)["temperature"] == 1.0


def test_a_renamed_run_on_a_read_only_disk_predicts_with_its_current_exports(own_run, data, monkeypatch):
    """The exports name their run; a renamed copy's differ only in that, and a read-only mount made every
    --engine onnx command fail trying to write it."""
    import cxrkit.export.onnx
    import cxrkit.serve.predictor
    from cxrkit.errors import CxrError

    renamed = own_run.rename(own_run.with_name("deployed"))
    stamp = (renamed / "export" / "best.onnx").stat().st_mtime_ns

    def read_only(path, metadata):
        raise CxrError(f"{path}: cannot write here (Read-only file system)")

    monkeypatch.setattr(cxrkit.export.onnx, "update_metadata", read_only)
    monkeypatch.setattr(cxrkit.serve.predictor, "folder_unwritable", lambda folder: "Read-only file system")
    result = CliRunner().invoke(app, ["predict", str(renamed), _images(data)[0], "--engine", "onnx"])
    assert result.exit_code == 0, result.output
    assert "best.onnx: cannot write here (Read-only file system); it keeps its old run in its metadata" in " ".join(
        result.stderr.split())
    assert (renamed / "export" / "best.onnx").stat().st_mtime_ns == stamp


@pytest.fixture
def read_only_run(run, tmp_path, monkeypatch):
    """A copy of the run without exports, on what behaves as a read-only disk (the tests run as root, so a chmod
    would not stop them writing)."""
    import cxrkit.runs

    copy = Path(shutil.copytree(run, tmp_path / run.name, ignore=shutil.ignore_patterns("export")))
    monkeypatch.setattr(cxrkit.runs, "folder_unwritable", lambda folder: "Read-only file system")
    return copy


@pytest.mark.parametrize("engine,file", [("onnx", "best.onnx"), ("onnx-int8", "best.int8.onnx")])
def test_an_onnx_engine_on_a_read_only_run_without_exports_is_a_one_line_error_with_a_way_out(read_only_run,
                                                                                                 engine, file):
    from cxrkit.errors import CxrError

    with pytest.raises(CxrError) as err:
        Predictor(read_only_run, engine=engine)
    assert str(err.value) == (f"{read_only_run / 'export' / file}: cannot write here (Read-only file system); "
                              "the ONNX engines export the model there once, so run them once where the run can be "
                              "written, or use --engine torch")  # it was an OSError from making RUN/export
    assert not (read_only_run / "export").exists()


def test_auto_on_a_read_only_run_without_exports_uses_pytorch_with_a_note(read_only_run, data, monkeypatch, capsys):
    import cxrkit.train.runtime

    monkeypatch.setattr(cxrkit.train.runtime, "cpu_supports_bf16", lambda: False)  # where auto picks ONNX Runtime
    predictor = Predictor(read_only_run, engine="auto")
    assert predictor.engine == "torch"
    note = " ".join(capsys.readouterr().err.split())
    assert "best.onnx: cannot write here (Read-only file system); using PyTorch instead" in note
    images = _images(data)[:2]
    assert [p.probabilities for p in predictor.predict_files(images)] == [
        p.probabilities for p in Predictor(read_only_run, engine="torch").predict_files(images)]
