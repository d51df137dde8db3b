"""Train -> evaluate -> predict on the real Kermany chest X-rays with real ImageNet weights (from ../shared).

Skipped when the data or weights are absent. Kept short for CI: one head-only epoch at 128 px.
"""

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxrkit.cli.main import app

SHARED = Path(os.environ.get("CXR_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DATA = SHARED / "data" / "chest_xray"
WEIGHTS = SHARED / "weights"

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(not DATA.is_dir() or not (WEIGHTS / "mobilenet_v2.in1k_dequantized.safetensors").is_file(),
                       reason="real data and weights from ../shared are not present"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("CXR_WEIGHTS_DIR", str(WEIGHTS))
    out = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(app, [
        "train", "recipes/pneumonia-mobilenetv2.yaml", "--data", str(DATA), "--out", str(out),
        "--set", "stages.0.epochs=1", "--set", "stages.1.epochs=0", "--set", "model.image_size=128",
    ])
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_real_split_is_patient_grouped(run):
    data = json.loads((run / "data.json").read_text())
    assert sum(s["images"] for s in data["splits"].values()) == 5216
    assert data["preprocessing"]["size"] == 128


def test_no_image_content_crosses_splits(run):
    """The set has byte-duplicate files; none may sit in two splits (that would leak test images into training)."""
    split_of_content: dict[str, set] = {}
    for row in csv.DictReader((run / "splits.csv").open()):
        digest = hashlib.sha1(Path(row["source"]).read_bytes()).hexdigest()
        split_of_content.setdefault(digest, set()).add(row["split"])
    assert len(split_of_content) < 5216  # the duplicates exist...
    assert all(len(splits) == 1 for splits in split_of_content.values())  # ...but never across splits


def test_evaluate_on_held_out_patients(run):
    result = CliRunner().invoke(app, ["evaluate", str(run), "--split", "test"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval" / "chest_xray-test" / "metrics.json").read_text())
    assert metrics["n"] > 900
    assert metrics["auc"] > 0.9  # one epoch on frozen ImageNet features already separates the classes


def test_predict_real_images(run):
    images = sorted((DATA / "train" / "PNEUMONIA").glob("*.jpeg"))[:4]
    result = CliRunner().invoke(app, ["predict", str(run), *map(str, images), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert {r["label"] for r in json.loads(result.stdout)} <= {"NORMAL", "PNEUMONIA"}
