"""Every data format and head type through train -> evaluate, on tiny synthetic data."""

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from data.helpers import covid_like, medmnist_npz
from PIL import Image
from synth import kermany_folder, nih_csv
from typer.testing import CliRunner

from cxrkit.cli.main import app
from cxrkit.errors import CxrError
from cxrkit.export.onnx import read_metadata

TINY = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--set", "model.image_size=32",
        "--set", "runtime.batch_size=8", "--set", "runtime.workers=0", "--epochs", "1"]


def _train(tmp_path: Path, *args: str) -> Path:
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "runs"), *TINY, *args])
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])


def _evaluate(run: Path, split: str = "test", engine: str = "torch") -> dict:
    result = CliRunner().invoke(app, ["evaluate", str(run), "--split", split, "--engine", engine, "--name", engine])
    assert result.exit_code == 0, result.output
    return json.loads(Path(result.stdout.strip().splitlines()[-1]).read_text())


def _train_and_evaluate(tmp_path: Path, *args: str, split: str = "test") -> dict:
    return _evaluate(_train(tmp_path, *args), split)


def test_multilabel_nih_csv_with_the_torch_and_int8_engines(tmp_path):
    run = _train(tmp_path, "--data", str(nih_csv(tmp_path / "nih")), "--task", "multilabel")
    metrics = _evaluate(run)
    assert metrics["task"] == "multilabel"
    assert len(metrics["labels"]) == 14
    assert set(metrics["auc_per_label"]) == set(metrics["labels"])
    int8 = _evaluate(run, engine="onnx-int8")  # quantized, with its own temperature for a multi-label head
    assert int8["engine"] == "onnx-int8" and int8["labels"] == metrics["labels"] and int8["n"] == metrics["n"]
    assert set(int8["auc_per_label"]) == set(metrics["labels"])
    # a multi-label threshold is not refitted: the int8 file states the 0.5 each label is decided at, as the fp32
    # file does, though labels.json holds none
    assert json.loads((run / "labels.json").read_text())["threshold"] is None
    assert int8["threshold"] == metrics["threshold"] == 0.5
    assert read_metadata(run / "export" / "best.int8.onnx")["threshold"] == 0.5
    assert read_metadata(run / "export" / "best.int8.onnx")["quantization"]["calibration"]["calibrated_on"] == "val"

    # cxr export counts agreement per finding too: a whole set of 14 findings rarely matches exactly
    result = CliRunner().invoke(app, ["export", str(run), "-f", "onnx-int8", "-o", str(tmp_path / "m.int8.onnx"),
                                      "--calibration-images", "4"])
    assert result.exit_code == 0, result.output
    with open(run / "splits.csv") as f:
        val = sum(row["split"] == "val" for row in csv.DictReader(f))
    assert f"of {val * 14} image-finding decisions (" in result.stderr

    before = (run / "labels.json").read_text()  # a binary threshold rule on 14 findings was accepted and ignored
    result = CliRunner().invoke(app, ["calibrate", str(run), "--target-sensitivity", "0.9"])
    assert result.exit_code != 0 and str(result.exception) == (
        "--target-sensitivity chooses a binary run's threshold; this multilabel run decides by a 0.5 threshold on "
        "each label. Without them, cxr calibrate fits its temperature")
    assert (run / "labels.json").read_text() == before


def test_medmnist_npz_with_its_own_splits(tmp_path):
    medmnist_npz(tmp_path / "mm" / "pneumoniamnist.npz", {"train": 24, "val": 8, "test": 8})
    metrics = _train_and_evaluate(tmp_path, "--data", str(tmp_path / "mm" / "pneumoniamnist.npz"))
    assert metrics["n"] == 8 and metrics["labels"] == ["normal", "pneumonia"]


def test_medmnist_by_name_from_the_data_folder(tmp_path, monkeypatch):
    """--data pneumoniamnist was made a path under the working directory before its name was recognised."""
    medmnist_npz(tmp_path / "mm" / "pneumoniamnist.npz", {"train": 24, "val": 8, "test": 8})
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "mm"))
    monkeypatch.chdir(tmp_path)
    run = _train(tmp_path, "--data", "pneumoniamnist")
    assert json.loads((run / "data.json").read_text())["dataset"]["name"] == "pneumoniamnist"


def test_combined_sources_three_classes_with_dense_head_and_oversampling(tmp_path):
    covid_like(tmp_path / "covid", per_class=8, size=32)
    kermany_folder(tmp_path / "kermany", per_class=8, size=32)
    sources = json.dumps([
        {"root": str(tmp_path / "covid"), "rename": {"Normal": "normal", "COVID": "COVID-19"}},
        {"root": str(tmp_path / "kermany"), "task": "normal-bacterial-viral", "include": ["viral"]},
    ])
    metrics = _train_and_evaluate(tmp_path, "--set", "data.format=combine", "--set", f"data.sources={sources}",
                                  "--set", "model.hidden=[16]", "--set", "model.dropout=0.5",
                                  "--set", "loss.sampling=oversample")
    assert metrics["labels"] == ["normal", "COVID-19", "viral"]
    assert metrics["task"] == "multiclass"


def test_external_validation_maps_labels_by_name(tmp_path):
    kermany_folder(tmp_path / "kermany", per_class=8, size=32)
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "kermany"), "--out", str(tmp_path / "r"),
                                      *TINY])
    assert result.exit_code == 0, result.output
    run = result.stdout.strip().splitlines()[-1]
    covid_like(tmp_path / "covid", per_class=4, size=32)
    unmapped = CliRunner().invoke(app, ["evaluate", run, "--data", str(tmp_path / "covid")])
    assert unmapped.exit_code != 0 and "COVID" in str(unmapped.exception)
    result = CliRunner().invoke(app, ["evaluate", run, "--data", str(tmp_path / "covid"), "--map", "COVID=PNEUMONIA",
                                      "--name", "adult"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((Path(run) / "eval" / "adult" / "metrics.json").read_text())
    assert metrics["external"] is True and metrics["n"] == 8 and metrics["split"] == "all"
    assert metrics["confusion_matrix"][0][0] + metrics["confusion_matrix"][0][1] == 4  # 4 Normal -> NORMAL
    assert "no splits of its own" not in result.stderr
    # a split asked for on a dataset that has none is not silently ignored
    asked = CliRunner().invoke(app, ["evaluate", run, "--data", str(tmp_path / "covid"), "--map", "COVID=PNEUMONIA",
                                     "--name", "adult-val", "--split", "val"])
    assert asked.exit_code == 0, asked.output
    assert f"note: {tmp_path / 'covid'} has no splits of its own, so --split val does not apply: all 8 images " \
           "were evaluated" in " ".join(asked.stderr.split())
    assert "skipped" not in asked.stderr
    broken = next((tmp_path / "covid").rglob("*.png")).with_name("broken.png")
    broken.write_text("not an image")  # left out by the scan, and now said so (it used to be silent)
    noted = CliRunner().invoke(app, ["evaluate", run, "--data", str(tmp_path / "covid"), "--map", "COVID=PNEUMONIA",
                                     "--name", "adult-broken"])
    assert noted.exit_code == 0, noted.output
    assert f"skipped 1 image(s) that cannot be used in {tmp_path / 'covid'}; the first: {broken}" in " ".join(
        noted.stderr.split())


@pytest.mark.parametrize("bad", ["data.rooot=x", "stages.0.trainable=top14", "model.image_size=0"])
def test_bad_recipe_keys_exit_cleanly(tmp_path, bad):
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--set", bad])
    assert result.exit_code != 0
    assert bad.split("=")[0].split(".")[-1] in str(result.exception)


def test_truncated_and_non_images_are_reported_and_skipped_by_the_scan(tmp_path):
    root = kermany_folder(tmp_path / "k", per_class=6, size=32)
    truncated = root / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    Image.new("L", (32, 32)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    (root / "train" / "PNEUMONIA" / "person999_virus_1.jpeg").write_text("not an image")
    result = CliRunner().invoke(app, ["train", "--data", str(root), "--out", str(tmp_path / "r"), *TINY])
    assert result.exit_code == 0, result.output
    data = json.loads((Path(result.stdout.strip().splitlines()[-1]) / "data.json").read_text())
    reasons = {Path(s["source"]).name: s["reason"] for s in data["skipped"]}
    assert "skipped 2 image(s) that cannot be used (the run's data.json lists them all)" in result.stderr
    assert "truncated" in reasons["IM-9999-0001.jpeg"]
    assert "not an image" in reasons["person999_virus_1.jpeg"]
    assert sum(s["images"] for s in data["splits"].values()) == 12  # 6 per class, the bad two left out


def _damage_pixels(paths):
    """Each JPEG becomes a PNG with a sound header and end chunk (the scan passes it) and damaged pixel data."""
    for path in paths:
        Image.open(path).save(path.with_suffix(".png"))
        path.unlink()
        data = bytearray(path.with_suffix(".png").read_bytes())
        data[data.index(b"IDAT") + 8] ^= 0xFF
        path.with_suffix(".png").write_bytes(bytes(data))


def test_an_image_that_fails_to_decode_during_training_names_the_file(tmp_path):
    """Without the decoded-image cache nothing decodes every image before training, so the first epoch meets it."""
    root = kermany_folder(tmp_path / "k", per_class=6, size=32)
    _damage_pixels((root / "train" / "NORMAL").glob("*.jpeg"))
    result = CliRunner().invoke(app, ["train", "--data", str(root), "--out", str(tmp_path / "r"), *TINY,
                                      "--set", "runtime.cache_images=false"])
    assert result.exit_code != 0
    assert re.search(r"NORMAL/IM-\d+-\d+\.png: corrupt or truncated image", str(result.exception))
    assert list((tmp_path / "r").iterdir()) == []  # failed before its first epoch was saved: no directory is left


def test_an_image_that_fails_to_decode_is_left_out_by_the_decoded_image_cache(tmp_path):
    """Building the cache decodes every image before the split, so one that passes the scan and fails to decode is
    left out and listed like the scan's (it used to stop training), and the resumed run agrees."""
    root = kermany_folder(tmp_path / "k", per_class=6, size=32)
    broken = sorted((root / "train" / "NORMAL").glob("*.jpeg"))[1]
    _damage_pixels([broken])
    broken = broken.with_suffix(".png")
    result = CliRunner().invoke(app, ["train", "--data", str(root), "--out", str(tmp_path / "r"), *TINY])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    data = json.loads((run / "data.json").read_text())
    assert [s["source"] for s in data["skipped"]] == [str(broken)]
    assert data["skipped"][0]["reason"].startswith("corrupt or truncated image")
    assert sum(s["images"] for s in data["splits"].values()) == 11
    assert str(broken) not in (run / "splits.csv").read_text()
    assert f"skipped 1 image(s) that cannot be used (the run's data.json lists them all); the first: {broken}" \
        in " ".join(result.stderr.split())
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run)])  # the cache leaves it out again
    assert resumed.exit_code == 0, resumed.output


@pytest.mark.parametrize(("case", "message"), [
    ("one level up", "did you mean {root}?"),
    ("one class", "has one class only (NORMAL); a classifier needs images of at least 2 classes"),
    ("missing weights", "weights.safetensors"),
    ("unknown layer", "nolayer"),
    ("unknown layer in stage 2", "recipe key stages.1.trainable: trainable 'from:nolayer': the backbone has no layer "
                                 "named 'nolayer'"),  # it used to fail after stage 1 had trained
    ("no epochs", "every stage has 0 epochs"),
])
def test_a_run_that_fails_before_its_first_epoch_leaves_no_directory(tmp_path, case, message):
    root = kermany_folder(tmp_path / "data" / "chest_xray", per_class=6, size=32)
    args = {
        "one level up": ["--data", str(tmp_path / "data")],
        "missing weights": ["--weights", str(tmp_path / "weights.safetensors")],
        "unknown layer": ["--set", "stages.0.trainable=from:nolayer"],
        "unknown layer in stage 2": ["--set", "stages.1.trainable=from:nolayer", "--set", "stages.1.epochs=1"],
        "no epochs": ["--epochs", "0"],
    }.get(case, [])
    if case == "one class":
        shutil.rmtree(root / "train" / "PNEUMONIA")
    result = CliRunner().invoke(app, ["train", "--data", str(root), "--out", str(tmp_path / "r"), *TINY, *args])
    assert result.exit_code != 0
    assert message.format(root=root) in str(result.exception)
    assert not (tmp_path / "r").exists() or list((tmp_path / "r").iterdir()) == []


def test_a_run_trained_from_relative_paths_is_used_from_another_directory(tmp_path, monkeypatch):
    kermany_folder(tmp_path / "work" / "data", per_class=6, size=32)
    monkeypatch.chdir(tmp_path / "work")
    run = _train(tmp_path, "--data", "data")
    recipe = (run / "recipe.yaml").read_text()
    assert f"root: {tmp_path / 'work' / 'data'}" in recipe
    monkeypatch.chdir(tmp_path)
    assert _evaluate(run)["n"] > 0


def test_paths_given_by_flags_are_taken_literally_not_as_yaml(tmp_path):
    """``--data "data #1"`` was read as YAML, whose `` #`` starts a comment: cxr trained on ``data`` (another
    dataset, when there was one) and wrote the run into ``runs``."""
    root = kermany_folder(tmp_path / "data #1", per_class=6, size=32)
    kermany_folder(tmp_path / "data", per_class=4, size=32)  # the folder the cut path named
    result = CliRunner().invoke(app, ["train", "--data", str(root), "--out", str(tmp_path / "runs #2"), *TINY])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    assert run.parent == tmp_path / "runs #2"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["data"]["root"] == str(root)
    assert not (tmp_path / "runs").exists()


def test_out_in_a_recipe_expands_home_and_variables(tmp_path, monkeypatch):
    """``out: ~/runs`` made a folder named ``~`` in the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = kermany_folder(tmp_path / "k", per_class=6, size=32)
    result = CliRunner().invoke(app, ["train", "--data", str(root), *TINY, "--set", "out=~/runs"])
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip().splitlines()[-1]).parent == tmp_path / "home" / "runs"
    assert not (tmp_path / "~").exists()


def test_a_training_loss_that_is_not_a_number_is_a_one_line_error(tmp_path):
    """It was a FloatingPointError with its traceback."""
    import torchvision
    from safetensors.torch import save_file

    state = torchvision.models.mobilenet_v3_small().state_dict()
    state["features.0.0.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    root = kermany_folder(tmp_path / "k", per_class=6, size=32)
    args = [a if a != "none" else str(tmp_path / "nan.safetensors") for a in TINY]
    result = CliRunner().invoke(app, ["train", "--data", str(root), "--out", str(tmp_path / "runs"), *args])
    assert result.exit_code != 0 and isinstance(result.exception, CxrError)
    assert re.fullmatch(r"training loss became nan in .+; lower the learning rate", str(result.exception))


def test_calibrate_infers_its_method_from_a_target_and_refuses_a_conflict(tmp_path):
    run = _train(tmp_path, "--data", str(kermany_folder(tmp_path / "k", per_class=12, size=32)),
                 "--set", "data.split.ratios=[0.5,0.3,0.2]")
    result = CliRunner().invoke(app, ["calibrate", str(run), "--target-sensitivity", "0.9"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "labels.json").read_text())["threshold_method"] == "sensitivity>=0.9"
    before = (run / "labels.json").read_text()
    result = CliRunner().invoke(app, ["calibrate", str(run), "--method", "youden", "--target-sensitivity", "0.9"])
    assert result.exit_code != 0 and "--target-sensitivity is for --method sensitivity" in str(result.exception)
    assert (run / "labels.json").read_text() == before
    next((tmp_path / "k").rglob("*.jpeg")).unlink()
    result = CliRunner().invoke(app, ["calibrate", str(run)])  # it said the run had no validation split
    assert result.exit_code != 0 and "the dataset changed since the splits were saved" in str(result.exception)


def test_a_missing_split_and_unmapped_labels_are_explained(tmp_path):
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "runs"), *TINY, "--data",
                                      str(kermany_folder(tmp_path / "k", per_class=8, size=32)),
                                      "--set", "data.split.ratios=[0.75,0.25]"])
    assert result.exit_code == 0, result.output
    assert "not calibrated: the run has no validation split" in result.stderr  # it used to say nothing
    run = Path(result.stdout.strip().splitlines()[-1])
    result = CliRunner().invoke(app, ["evaluate", str(run), "--split", "val"])
    assert result.exit_code != 0 and str(result.exception).endswith("has no val split (it has train, test)")
    covid_like(tmp_path / "covid", per_class=2, size=32)
    result = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(tmp_path / "covid")])
    assert "--map COVID=LABEL on the command line" in str(result.exception)


def test_own_splits_that_share_a_patient_are_noted(tmp_path):
    """A dataset's own splits are kept, but one patient in two of them made held-out numbers optimistic silently."""
    import shutil

    root = kermany_folder(tmp_path / "k", per_class=8, size=32, splits=("train", "val", "test"))
    args = ["train", "--data", str(root), "--out", str(tmp_path / "runs"), *TINY]
    clean = CliRunner().invoke(app, args)
    assert clean.exit_code == 0, clean.output
    assert "more than one split" not in clean.stderr
    shutil.copy(root / "train" / "NORMAL" / "IM-1000-0001.jpeg", root / "test" / "NORMAL" / "IM-1000-0003.jpeg")
    shared = CliRunner().invoke(app, args)
    assert shared.exit_code == 0, shared.output
    assert "note: the dataset's own splits put 1 patient(s) in more than one split (the first: IM-1000)" in " ".join(
        shared.stderr.split())


def test_a_csv_whose_every_path_is_wrong_says_why_it_has_no_images(tmp_path):
    (tmp_path / "labels.csv").write_text("path,label\nnowhere/a.png,x\nnowhere/b.png,y\n")
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "labels.csv"), "--out", str(tmp_path), *TINY])
    assert result.exit_code != 0
    assert str(result.exception) == (f"dataset {tmp_path / 'labels.csv'} has no images; skipped 2 image(s) that "
                                     f"cannot be used; the first: {tmp_path / 'nowhere' / 'a.png'}: image file "
                                     "not found")


def test_a_dataset_with_only_a_test_folder_and_a_split_without_test_images_are_explained(tmp_path):
    only_test = kermany_folder(tmp_path / "only", per_class=4, size=32, splits=("test",))
    result = CliRunner().invoke(app, ["train", "--data", str(only_test), "--out", str(tmp_path / "runs"), *TINY])
    assert result.exit_code != 0
    assert str(result.exception) == ("only: its own splits hold no training images (8 test); add a train split, or "
                                     "set data.split.use_own: false to split all of them")
    result = CliRunner().invoke(app, ["train", "--data", str(kermany_folder(tmp_path / "k", per_class=8, size=32)),
                                      "--out", str(tmp_path / "runs"), *TINY, "--set", "data.split.ratios=[1,0,0]"])
    assert result.exit_code == 0, result.output
    assert "note: the test split is empty" in result.stderr
    # --backbone names the run: the defaults' "run" does not name one, so it is appended
    assert Path(result.stdout.strip().splitlines()[-1]).name.startswith("run-mobilenet_v3_small-")


def test_a_run_is_named_after_the_backbone_that_replaced_the_recipe_s(tmp_path):
    from cxrkit.cli.train import _named_for_backbone
    from cxrkit.config import load_recipe

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "kermany-densenet121-weighted.yaml"
    base = load_recipe(recipe)
    assert _named_for_backbone(load_recipe(recipe, ["model.backbone=googlenet"]), base).name == (
        "kermany-googlenet-weighted")
    assert _named_for_backbone(base, base).name == "kermany-densenet121-weighted"
    main = load_recipe(recipe.with_name("pneumonia-mobilenetv2.yaml"))  # names mobilenet_v2 without its "_"
    assert _named_for_backbone(load_recipe(recipe.with_name("pneumonia-mobilenetv2.yaml"),
                                           ["model.backbone=resnet18"]), main).name == "pneumonia-resnet18"
    named = load_recipe(recipe, ["model.backbone=googlenet", "name=mine"])
    assert _named_for_backbone(named, base).name == "mine"  # a name of the user's own stays


def test_images_without_patient_ids_are_noted_at_splitting_and_the_report_says_so(tmp_path):
    """A CSV without its Patient ID column made each image its own patient without a word, while the report said
    the split was grouped by patient: 17 of 52 NIH patients had images in two splits."""
    csv_path = nih_csv(tmp_path / "nih")
    rows = list(csv.DictReader(csv_path.open()))
    rows[3]["Patient ID"] = " "  # a blank cell: that image alone has no id
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    args = ["train", "--out", str(tmp_path / "runs"), *TINY, "--data", str(csv_path), "--task", "multilabel"]
    blank = CliRunner().invoke(app, args)
    assert blank.exit_code == 0, blank.output
    assert f"note: 1 of 40 images have no patient id (the first: {tmp_path / 'nih' / 'images'}" in blank.stderr
    for row in rows:
        del row["Patient ID"]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "note: 40 of 40 images have no patient id" in " ".join(result.stderr.split())
    run = Path(result.stdout.strip().splitlines()[-1])
    assert json.loads((run / "data.json").read_text())["without_patient_id"] == 40
    report = CliRunner().invoke(app, ["report", str(run)])
    assert report.exit_code == 0, report.output
    html = Path(report.stdout.strip().splitlines()[-1]).read_text()
    assert "Split grouped by patient, but 40 images have no patient id" in html
    assert "all images of a patient are in the same split" not in html
