"""End to end on synthetic data: cxr train -> evaluate -> predict, resume after kill -9, and DDP under torchrun."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synth import kermany_folder
from typer.testing import CliRunner

from cxrkit.cli.main import app
from cxrkit.runs import Run

TINY = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--set", "model.image_size=48",
        "--set", "runtime.batch_size=8", "--set", "runtime.workers=0"]
CXR = [sys.executable, "-m", "cxrkit.cli.main"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return kermany_folder(tmp_path_factory.mktemp("xray"), per_class=16, size=48)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out), *TINY,
                                      "--set", "stages.0.epochs=1", "--set", "stages.1.trainable=top:2:blocks",
                                      "--set", "stages.1.epochs=1", "--set", "stages.1.lr=1e-4"])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    assert run.parent == out
    return run


def test_train_writes_a_complete_run(trained):
    for name in ("recipe.yaml", "labels.json", "data.json", "splits.csv", "env.json", "metrics.csv",
                 "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (trained / name).is_file(), name
    rows = list(csv.DictReader((trained / "metrics.csv").open()))
    assert [r["stage"] for r in rows] == ["1", "2"]
    labels = json.loads((trained / "labels.json").read_text())
    assert labels["labels"] == ["NORMAL", "PNEUMONIA"] and labels["positive"] == "PNEUMONIA"
    assert labels["calibrated_on"] == "val" and labels["temperature"] > 0  # fitted on validation, never on test
    assert 0 <= labels["threshold"] <= 1 and labels["threshold_method"]
    splits = list(csv.DictReader((trained / "splits.csv").open()))
    by_patient: dict[str, set] = {}
    for row in splits:
        by_patient.setdefault(row["patient"], set()).add(row["split"])
    assert all(len(s) == 1 for s in by_patient.values())  # no patient in two splits


def test_evaluate_writes_the_metrics_schema(trained):
    result = CliRunner().invoke(app, ["evaluate", str(trained), "--split", "test"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path(result.stdout.strip().splitlines()[-1]).read_text())
    for key in ("task", "labels", "n", "accuracy", "auc", "f1_macro", "confusion_matrix", "sensitivity",
                "specificity", "threshold"):
        assert key in metrics, key
    assert metrics["task"] == "binary" and metrics["n"] == sum(map(sum, metrics["confusion_matrix"]))
    for key in ("accuracy", "auc", "sensitivity", "specificity"):
        assert key in metrics["ci95"]
    assert metrics["ci95"]["method"]["resampled"] == "patients"
    assert 0 <= metrics["ece"] <= 1 and metrics["temperature"] > 0
    out = Path(result.stdout.strip().splitlines()[-1]).parent
    for figure in ("roc.png", "pr.png", "confusion.png", "reliability.png", "output_distribution.png"):
        assert (out / figure).stat().st_size > 1000, figure


def test_evaluations_by_another_engine_or_checkpoint_keep_their_own_folders(trained):
    folders = {}
    for args in ([], ["--engine", "onnx"], ["--checkpoint", "last"]):
        result = CliRunner().invoke(app, ["evaluate", str(trained), "--split", "val", *args])
        assert result.exit_code == 0, result.output
        folders[tuple(args)] = Path(result.stdout.strip().splitlines()[-1]).parent
    plain = folders[()].name
    assert plain.endswith("-val")
    assert folders[("--engine", "onnx")].name == f"{plain}-onnx"
    assert folders[("--checkpoint", "last")].name == f"{plain}-last"
    for args, folder in folders.items():  # each kept its own metrics: none overwrote another
        metrics = json.loads((folder / "metrics.json").read_text())
        assert (metrics["engine"], metrics["checkpoint"]) == {(): ("torch", "best"), ("--engine", "onnx"): (
            "onnx", "best"), ("--checkpoint", "last"): ("torch", "last")}[args]


def test_evaluate_on_a_run_that_cannot_be_written_says_so_before_predicting(trained, monkeypatch):
    """It predicted the whole split, then failed on RUN/eval without saying what to do."""
    import cxrkit.runs
    from cxrkit.serve.predictor import Predictor

    monkeypatch.setattr(cxrkit.runs, "folder_unwritable", lambda folder: "Read-only file system")
    monkeypatch.setattr(Predictor, "predict_dataset", lambda *args, **kwargs: pytest.fail("predicted first"))
    result = CliRunner().invoke(app, ["evaluate", str(trained), "--split", "val", "--name", "ro"])
    assert result.exit_code != 0
    assert str(result.exception) == (f"{trained / 'eval' / 'ro' / 'metrics.json'}: cannot write here (Read-only file "
                                     "system); cxr evaluate keeps its results in the run, so evaluate a copy of the "
                                     "run that can be written")
    assert not (trained / "eval" / "ro").exists()


def test_an_evaluation_that_cannot_be_written_leaves_the_earlier_one_under_its_name(trained, monkeypatch):
    """Evaluating again under one name removed the earlier files first: when the disk then filled (here after the
    new predictions.csv) both evaluations were lost."""
    import errno

    first = CliRunner().invoke(app, ["evaluate", str(trained), "--split", "val", "--name", "kept"])
    assert first.exit_code == 0, first.output
    out = trained / "eval" / "kept"
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    fsync, synced = os.fsync, []

    def disk_fills(fd):
        synced.append(fd)
        if len(synced) == 2:  # the first figure
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_fills)
    again = CliRunner().invoke(app, ["evaluate", str(trained), "--split", "test", "--name", "kept"])
    monkeypatch.undo()
    assert again.exit_code != 0
    assert re.fullmatch(rf"{re.escape(str(out))}/\w+\.png: cannot write \(No space left on device\)",
                        str(again.exception)), again.exception
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # no file changed, none added


def test_predict_formats_and_bad_files(trained, data, tmp_path):
    images = sorted((data / "train" / "PNEUMONIA").glob("*.jpeg"))[:3]
    result = CliRunner().invoke(app, ["predict", str(trained), *map(str, images), "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 3
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)
    bad = tmp_path / "note.jpeg"
    bad.write_text("not an image")
    result = CliRunner().invoke(app, ["predict", str(trained), str(images[0]), str(bad), "--format", "csv"])
    assert result.exit_code == 1
    assert "note.jpeg" in result.stderr
    assert str(images[0]) in result.stdout  # the good file is still predicted


def test_unknown_backbone_is_one_line_error(data, tmp_path):
    proc = subprocess.run([*CXR, "train", "--data", str(data), "--backbone", "mobilenet_v9", "--out",
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown backbone 'mobilenet_v9'")
    assert len(proc.stderr.strip().splitlines()) == 1


def _train_cmd(data, out, epochs, *sets):
    return [*CXR, "train", "--data", str(data), "--out", str(out), *TINY, "--set", f"stages.0.epochs={epochs}",
            "--set", "stages.0.trainable=all", "--set", "runtime.precision=fp32",
            *[arg for kv in sets for arg in ("--set", kv)]]


# a DataLoader worker (persistent, started once per process) and augmentation: with them a resumed run used to
# draw other dropout masks and augment differently in its first epoch (0.7% off in train loss)
WORKER_AND_AUGMENTATION = ("runtime.workers=1", "augment.policy=light", "model.dropout=0.3")


@pytest.mark.slow
@pytest.mark.parametrize("sets", [(), WORKER_AND_AUGMENTATION], ids=["plain", "worker-augment-dropout"])
def test_resume_after_kill_matches_an_uninterrupted_run(data, tmp_path, sets):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(_train_cmd(data, tmp_path / "whole", 3, *sets), capture_output=True, text=True, env=env)
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen(_train_cmd(data, tmp_path / "killed", 3, *sets), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    metrics = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "killed").glob("*/checkpoints/last.pt"))  # saved after epoch 1's row
        if found:
            metrics = found[0].parent.parent / "metrics.csv"
            break
        time.sleep(0.05)
    assert metrics is not None, "epoch 1 did not finish"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = metrics.parent
    resumed = subprocess.run([*CXR, "train", "--resume", str(run)], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == str(run)
    rows = list(csv.DictReader(metrics.open()))
    reference = list(csv.DictReader(next((tmp_path / "whole").glob("*/metrics.csv")).open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    for got, want in zip(rows, reference):
        assert float(got["train_loss"]) == pytest.approx(float(want["train_loss"]), rel=1e-4)
        assert float(got["val_loss"]) == pytest.approx(float(want["val_loss"]), rel=1e-4)


@pytest.mark.parametrize("write", ["metrics", "last", "no-last"])
def test_an_interruption_at_either_write_of_an_epoch_resumes_to_the_same_run(data, tmp_path, monkeypatch, write):
    """Each epoch writes its metrics.csv row, then last.pt; a kill between the two (or during either) must neither
    lose a row nor shift the epochs after it (which reseed from the epoch number). ``no-last``: as a kill -9 before
    the first last.pt leaves a run (rows written, no checkpoint), which starts again from its first epoch."""
    cmd = ["train", "--data", str(data), *TINY, "--set", "stages.0.epochs=3", "--set", "stages.0.trainable=all",
           "--set", "runtime.precision=fp32"]
    whole = CliRunner().invoke(app, [*cmd, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    calls = {"metrics": 0, "last": 0}
    write_metrics, save_checkpoint = Run.write_metrics, Run.save_checkpoint

    def interrupt(kind):
        calls[kind] += 1
        if kind == write.replace("no-", "") and calls[kind] == 2:  # epoch 2
            raise KeyboardInterrupt

    monkeypatch.setattr(Run, "write_metrics", lambda run, rows: (interrupt("metrics"), write_metrics(run, rows)))
    monkeypatch.setattr(Run, "save_checkpoint", lambda run, name, state: (
        interrupt("last") if name == "last" else None, save_checkpoint(run, name, state)))
    killed = CliRunner().invoke(app, [*cmd, "--out", str(tmp_path / "killed")])
    assert killed.exit_code == 130
    monkeypatch.undo()
    run = next((tmp_path / "killed").glob("*/recipe.yaml")).parent
    if write == "no-last":
        (run / "checkpoints" / "last.pt").unlink()
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    reference = list(csv.DictReader(next((tmp_path / "whole").glob("*/metrics.csv")).open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([float(r["train_loss"]) for r in reference],
                                                                    rel=1e-5)


def test_a_run_stopped_while_calibrating_is_calibrated_when_resumed(data, tmp_path, monkeypatch):
    import cxrkit.eval.calibrate
    from cxrkit.train.api import run_is_complete

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(cxrkit.eval.calibrate, "calibrate_run", stopped)
        killed = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path), *TINY,
                                          "--set", "stages.0.epochs=1"])
    assert killed.exit_code == 130
    run = next(tmp_path.glob("*/recipe.yaml")).parent
    assert "calibrated_on" not in json.loads((run / "labels.json").read_text())
    assert not run_is_complete(Run(run))  # every stage finished, but not the calibration
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert "calibrating, which the interruption stopped" in resumed.stderr
    assert json.loads((run / "labels.json").read_text())["calibrated_on"] == "val"
    assert run_is_complete(Run(run))
    again = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert again.exit_code == 0 and "already complete" in again.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_ddp_two_cpu_processes_on_gloo(data, tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "cxrkit.cli.main", "train", "--data", str(data),
           "--out", str(tmp_path), *TINY, "--set", "stages.0.epochs=2", "--set", "stages.0.trainable=all"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(proc.stdout.strip().splitlines()[-1])
    assert "2 processes" in json.loads((run / "env.json").read_text())["runtime"]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 2 and all(float(r["val_loss"]) > 0 for r in rows)
    total_train = json.loads((run / "data.json").read_text())["splits"]["train"]["images"]
    assert total_train > 0


def _losses(data, out, sets):
    """Train the tiny recipe with ``sets`` (``key=value`` overrides) into ``out``: its train and val loss of every
    epoch, and its log."""
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out), *TINY,
                                      *[arg for kv in sets for arg in ("--set", kv)]])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    rows = csv.DictReader((run / "metrics.csv").open())
    return [float(r[key]) for r in rows for key in ("train_loss", "val_loss")], result.stderr


def test_augmented_training_does_not_depend_on_the_number_of_workers(data, tmp_path):
    """Each image's augmentation is seeded from (seed, epoch) and the loaders do not draw from the global random
    stream, so one DataLoader worker gives the losses of none (they used to differ from the second epoch on)."""
    sets = ["stages.0.trainable=all", "stages.0.epochs=2", "augment.policy=light",
            "model.dropout=0.3", "runtime.precision=fp32"]
    in_process, _ = _losses(data, tmp_path / "none", [*sets, "runtime.workers=0"])
    one_worker, _ = _losses(data, tmp_path / "one", [*sets, "runtime.workers=1"])
    assert one_worker == pytest.approx(in_process, rel=1e-5)


def test_early_stopping_restores_the_stage_best_and_best_pt_follows_its_monitor(data, tmp_path):
    """A head stage of 4 epochs that must improve val_loss by 100 stops after 2 (patience 1); restoring its best
    epoch leaves the weights of a 1-epoch run, not those of its second epoch. best.pt is the epoch with the best
    ``runtime.checkpoint_monitor``, and a stage that judges its epochs by another metric gets a note saying so."""
    import torch

    def train(name, *sets):
        result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / name), *TINY,
                                          "--set", "runtime.precision=fp32",
                                          *[arg for kv in sets for arg in ("--set", kv)]])
        assert result.exit_code == 0, result.output
        run = Path(result.stdout.strip().splitlines()[-1])
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        checkpoint = {name: torch.load(run / "checkpoints" / f"{name}.pt", weights_only=False)
                      for name in ("best", "last")}
        return rows, checkpoint, result.stderr

    stop = ["stages.0.epochs=4", "stages.0.lr=1e-2", "stages.0.early_stopping.patience=1",
            "stages.0.early_stopping.min_delta=100"]
    one_rows, one, _ = train("one", "stages.0.epochs=1", "stages.0.lr=1e-2")
    rows, restored, log = train("restored", *stop)
    kept_rows, kept, kept_log = train("kept", *stop, "stages.0.early_stopping.restore_best=false",
                                      "runtime.checkpoint_monitor=val_auc")
    zero_rows, _, zero_log = train("zero", *stop[:2], "stages.0.early_stopping.patience=0",
                                   "stages.0.early_stopping.min_delta=100")  # as Keras: stop at the first worse
    for log_, rows_ in ((log, rows), (kept_log, kept_rows), (zero_log, zero_rows)):  # patience 0 stopped after 1
        assert len(rows_) == 2 and "early stopping: val_loss has not improved for 1 epoch(s)" in log_
    assert rows[0] == {**one_rows[0], "train_seconds": rows[0]["train_seconds"], "val_seconds": rows[0]["val_seconds"],
                       "images_per_second": rows[0]["images_per_second"]}  # the same first epoch
    head = [key for key in one["last"]["model"] if key.startswith("head")]
    assert head
    for key in head:
        torch.testing.assert_close(restored["last"]["model"][key], one["last"]["model"][key])
    assert "restored the stage's best weights" in log and "restored" not in kept_log
    assert any(not torch.equal(kept["last"]["model"][key], one["last"]["model"][key]) for key in head)
    # best.pt: the first epoch with the lowest val_loss (default), or the highest val_auc when asked
    assert restored["best"]["monitor"] == "val_loss" and kept["best"]["monitor"] == "val_auc"
    assert restored["best"]["epoch"] == int(min(rows, key=lambda r: float(r["val_loss"]))["epoch"])
    assert kept["best"]["epoch"] == int(max(kept_rows, key=lambda r: float(r["val_auc"]))["epoch"])
    assert ("judges its epochs by val_loss (early_stopping.monitor), but best.pt is chosen by val_auc "
            "(runtime.checkpoint_monitor)") in kept_log
    assert "best.pt is chosen by" not in log


def test_training_ends_by_naming_the_epoch_of_best_pt_and_notes_when_the_later_stage_is_not_in_it(data, tmp_path):
    """best.pt is what evaluate, predict and export use: a second stage that never beats the first one's val_loss
    (here an absurd learning rate) is not in it, and the user is told, rather than only that the stage's best
    weights were restored."""
    def train(name, *sets):
        result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / name), *TINY,
                                          "--set", "runtime.precision=fp32", "--set", "stages.0.epochs=2",
                                          "--set", "stages.1.trainable=head", "--set", "stages.1.epochs=2",
                                          *[arg for kv in sets for arg in ("--set", kv)]])
        assert result.exit_code == 0, result.output
        run = Path(result.stdout.strip().splitlines()[-1])
        return Run(run).load_checkpoint("best"), result.stderr

    best, log = train("worse", "stages.1.lr=100", "stages.1.name=finetune")
    assert best["stage"] == 0
    assert (f"best.pt: epoch {best['epoch']} of 4 (stage 1, train), val_loss {best['score']:.4f}; evaluate, predict "
            "and export use it") in log
    assert "note: no epoch of stage 2 (finetune) did better on val_loss, so best.pt holds none of their training" in log
    best, log = train("better", "stages.1.lr=1e-3")
    assert f"best.pt: epoch {best['epoch']} of 4 (stage {best['stage'] + 1}, train)" in log
    assert ("no epoch of stage" in log) == (best["stage"] == 0)


def test_feature_cache_trains_the_head_exactly_as_the_full_model_does(data, tmp_path):
    """A frozen backbone gives the same features every epoch, so training on cached features must match."""
    losses, logs = {}, {}
    for cache in ("true", "false"):
        losses[cache], logs[cache] = _losses(data, tmp_path / cache, ["stages.0.epochs=2", "runtime.precision=fp32",
                                                                     f"runtime.cache_features={cache}"])
    assert "cached backbone features" in logs["true"] and "cached backbone features" not in logs["false"]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def test_predict_dicom_monochrome1_equals_monochrome2(trained, tmp_path):
    import numpy as np
    from data.helpers import write_dicom

    pixels = (np.random.default_rng(0).random((48, 48)) * 4000).astype(np.uint16)
    mono2 = write_dicom(tmp_path / "a.dcm", pixels, "MONOCHROME2")
    mono1 = write_dicom(tmp_path / "b.dcm", 4095 - pixels, "MONOCHROME1")
    result = CliRunner().invoke(app, ["predict", str(trained), str(mono2), str(mono1), "--format", "json"])
    assert result.exit_code == 0, result.output
    first, second = json.loads(result.stdout)
    assert first["probabilities"] == pytest.approx(second["probabilities"], abs=1e-6)


def test_resuming_a_finished_run_changes_nothing(trained):
    before = (trained / "metrics.csv").read_text()
    result = CliRunner().invoke(app, ["train", "--resume", str(trained)])
    assert result.exit_code == 0, result.output
    assert "already complete" in result.stderr
    assert (trained / "metrics.csv").read_text() == before


@pytest.mark.parametrize("stages", [
    # head, then the top blocks from cached activations at a boundary inside the backbone
    ["stages.0.epochs=1", "stages.1.trainable=top:2:blocks", "stages.1.epochs=2", "stages.1.lr=1e-3"],
    # head, all, head again: the second head stage must not reuse features from before the full fine-tuning
    ["stages.0.epochs=1", "stages.1.trainable=all", "stages.1.epochs=1", "stages.1.lr=1e-3",
     "stages.2.name=head-again", "stages.2.trainable=head", "stages.2.epochs=1", "stages.2.lr=1e-3"],
])
def test_cached_activations_train_exactly_as_the_full_model_does(data, tmp_path, stages):
    losses, logs = {}, {}
    for cache in ("true", "false"):
        losses[cache], logs[cache] = _losses(data, tmp_path / cache, [*stages, "runtime.precision=fp32",
                                                                     f"runtime.cache_features={cache}"])
        assert len(losses[cache]) == 2 * sum(int(kv.split("=")[1]) for kv in stages if ".epochs=" in kv)
    if "stages.1.trainable=top:2:blocks" in stages:
        assert "cached inputs of features." in logs["true"]
    assert "cached backbone features" not in logs["false"] and "cached inputs of" not in logs["false"]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def test_onnx_runtime_caching_trains_as_pytorch_caching_does(data, tmp_path, monkeypatch):
    """Head stage, then the top blocks from a boundary inside the backbone: features cached by ONNX Runtime give
    the losses of features cached by PyTorch (to fp32 rounding)."""
    sets = ["stages.0.epochs=1", "stages.1.trainable=top:2:blocks", "stages.1.epochs=2", "stages.1.lr=1e-3",
            "runtime.precision=fp32"]
    losses, logs = {}, {}
    for engine in ("onnx", "torch"):
        monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / engine / "cache"))  # each engine computes its own
        losses[engine], logs[engine] = _losses(data, tmp_path / engine, [*sets, f"runtime.cache_engine={engine}"])
    assert len(losses["onnx"]) == 2 * 3
    assert logs["onnx"].count("feature caching uses ONNX Runtime") == 2  # one export per cached stage
    assert "cached inputs of features." in logs["onnx"] and "ONNX" not in logs["torch"]
    assert losses["onnx"] == pytest.approx(losses["torch"], rel=1e-4)


def test_decoded_image_cache_trains_exactly_as_decoding_every_epoch(data, tmp_path, monkeypatch):
    """With augmentation every epoch reads images; from the decoded cache they must be the same inputs."""
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))  # built here, not by an earlier test
    losses, logs = {}, {}
    for cache in ("true", "false"):
        result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / cache), *TINY,
                                          "--set", "augment.policy=light", "--set", "stages.0.epochs=2",
                                          "--set", "stages.1.trainable=head", "--set", "stages.1.epochs=1",
                                          "--set", "runtime.precision=fp32",
                                          "--set", f"runtime.cache_images={cache}"])
        assert result.exit_code == 0, result.output
        run = Path(result.stdout.strip().splitlines()[-1])
        logs[cache] = result.stderr
        losses[cache] = [float(r[key]) for r in csv.DictReader((run / "metrics.csv").open())
                         for key in ("train_loss", "val_loss")]
    assert "feature cache off: augmentation" in logs["true"]
    assert "images once into" in logs["true"] and "images once into" not in logs["false"]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)


def test_flips_alone_are_augmentation(data, tmp_path, monkeypatch):
    """``augment: {policy: none, hflip: true}`` flips training images: features are not cached (they used to be,
    and the flips were silently dropped), and the run records the augmentation."""
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    _, log = _losses(data, tmp_path, ["stages.0.epochs=1", "augment.hflip=true"])
    assert "feature cache off: augmentation" in log and "cached backbone features" not in log
    run = next(tmp_path.glob("*/data.json")).parent
    assert json.loads((run / "data.json").read_text())["augment"]["hflip"] is True


def test_cached_features_are_reused_by_the_next_run_and_not_by_a_changed_one(data, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    args = ["train", "--data", str(data), *TINY, "--set", "stages.0.epochs=1",
            "--set", "stages.1.trainable=top:2:blocks", "--set", "stages.1.epochs=1", "--set", "runtime.precision=fp32"]
    runs = {}
    for name, extra in (("first", []), ("again", []), ("other-seed", ["--set", "seed=1"])):
        result = CliRunner().invoke(app, [*args, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        run = Path(result.stdout.strip().splitlines()[-1])
        rows = csv.DictReader((run / "metrics.csv").open())
        runs[name] = (result.stderr, [(r["train_loss"], r["val_loss"]) for r in rows])
    assert "reused cached" not in runs["first"][0]
    assert runs["again"][0].count("reused cached") == 2  # the head's features and the boundary's input
    assert runs["again"][1] == runs["first"][1]
    # another seed initialises another (random) backbone: other features, other keys
    assert "reused cached" not in runs["other-seed"][0]


def test_a_run_resumed_inside_a_top_n_stage_reuses_the_cached_boundary_input(data, tmp_path, monkeypatch):
    """The layers above the boundary have trained when a top-N stage is resumed; the input of the boundary has not
    changed, so its cache entry is found again rather than computed and stored a second time."""
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    args = ["train", "--data", str(data), *TINY, "--set", "stages.0.epochs=1", "--set", "stages.1.epochs=2",
            "--set", "stages.1.trainable=top:2:blocks", "--set", "runtime.precision=fp32", "--out", str(tmp_path)]
    save_checkpoint = Run.save_checkpoint

    def interrupted(run, name, state):
        if name == "last" and state["stage"] == 1 and state["stage_epoch"] == 2:  # epoch 1 trained the top blocks
            raise KeyboardInterrupt
        save_checkpoint(run, name, state)

    monkeypatch.setattr(Run, "save_checkpoint", interrupted)
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 130, first.output
    monkeypatch.undo()
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    entries = sorted((tmp_path / "cache" / "features").glob("*.json"))
    run = next(tmp_path.glob("*/recipe.yaml")).parent
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming at stage 2, epoch 2" in resumed.stderr
    assert "reused cached inputs of" in resumed.stderr
    assert sorted((tmp_path / "cache" / "features").glob("*.json")) == entries


def test_reused_features_train_on_this_runs_labels(data, tmp_path, monkeypatch):
    """The feature key covers the images, not their labels: a run whose labels differ (here a renamed class, which
    reorders the label indices) reuses the features but must train and validate on its own labels."""
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    head = ["stages.0.epochs=2", "runtime.precision=fp32"]
    first, _ = _losses(data, tmp_path / "first", head)
    renamed = [*head, "data.rename={NORMAL: ZNORMAL}"]  # labels sort as PNEUMONIA, ZNORMAL: the indices swap
    reused, log = _losses(data, tmp_path / "renamed", renamed)
    computed, _ = _losses(data, tmp_path / "uncached", [*renamed, "runtime.cache_features=false"])
    assert "reused cached backbone features" in log
    assert reused == pytest.approx(computed, rel=1e-5)
    assert reused != pytest.approx(first, rel=1e-5)  # the stored targets were the first run's


def test_onnx_caching_under_bf16_is_refused_before_training_whatever_the_cache_holds(data, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    bf16 = ["stages.0.epochs=1", "runtime.precision=bf16"]
    _losses(data, tmp_path / "filled", bf16)  # the features this run needs are now cached
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "refused"), *TINY,
                                      *[a for kv in [*bf16, "runtime.cache_engine=onnx"] for a in ("--set", kv)]])
    assert result.exit_code != 0 and "computes in fp32, but runtime.precision is bf16" in str(result.exception)
    assert not (tmp_path / "refused").exists() or not list((tmp_path / "refused").iterdir())


def test_a_stage_with_no_epochs_caches_nothing(data, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    _, log = _losses(data, tmp_path / "runs", ["stages.0.trainable=top:2:blocks", "stages.0.epochs=0",
                                                "stages.1.trainable=head", "stages.1.epochs=1"])
    assert "cached inputs of" not in log and "cached backbone features" in log


def test_a_read_only_cache_keeps_features_in_memory_with_one_note(data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "features").mkdir(parents=True)
    (cache / "decoded").mkdir()
    from cxrkit import cache as cache_module

    monkeypatch.setattr(cache_module, "folder_unwritable", lambda folder: "Read-only file system")
    monkeypatch.setenv("CXR_CACHE_DIR", str(cache))
    _, log = _losses(data, tmp_path / "runs", ["stages.0.epochs=1", "stages.1.trainable=top:2:blocks",
                                                "stages.1.epochs=1", "augment.policy=none"])
    assert log.count("features stay in memory") == 1 and "(Read-only file system)" in log
    assert not list(cache.rglob("*.*"))


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_draw_on_a_terminal_and_leave_no_blank_line_in_a_log(trained, monkeypatch, terminal):
    monkeypatch.setenv("TTY_COMPATIBLE", "1" if terminal else "0")  # rich: treat stderr as a terminal, or not
    result = CliRunner().invoke(app, ["evaluate", str(trained), "--split", "val", "--name", f"progress-{terminal}"])
    assert result.exit_code == 0, result.output
    assert bool(re.search(r"predict \S*━", result.stderr)) is terminal  # the bar: its name, then the bar (in colour)
    if not terminal:  # a log file gets the notes, one per line, and nothing of the bar
        assert result.stderr.strip() and "" not in result.stderr.rstrip("\n").splitlines()
