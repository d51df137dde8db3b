"""``cxr embed`` on a tiny trained run: files, sampling, layers, methods, errors; the kNN score and the figure."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from synth import kermany_folder
from typer.testing import CliRunner

from cxrkit.cli.main import app, main
from cxrkit.errors import CxrError
from cxrkit.explain.embed import class_view, knn_balanced_accuracy, stratified_sample
from cxrkit.explain.embed_figure import CORRECT_MARKER, WRONG_MARKER, embedding_figure, embedding_titles

TINY = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--set", "model.image_size=48",
        "--set", "runtime.batch_size=8", "--set", "runtime.workers=0", "--set", "runtime.precision=fp32",
        "--set", "runtime.threads=1",  # OpenMP threads fighting other processes on a small machine are 100x slower
        "--set", "stages.0.trainable=all"]  # a frozen random backbone gives every image the same features


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = kermany_folder(tmp_path_factory.mktemp("xray"), per_class=24, size=48)
    out = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out), *TINY,
                                      "--set", "stages.0.epochs=3", "--set", "stages.0.lr=3e-3",
                                      "--set", "stages.1.trainable=head", "--set", "stages.1.epochs=1"])
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])


def _embed(run: Path, out: Path, *args: str) -> list[dict]:
    """Run ``cxr embed``; the summaries (JSON) of the maps it wrote, each with its CSV rows under ``rows``."""
    result = CliRunner().invoke(app, ["embed", str(run), "--split", "train", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    paths = [Path(line) for line in result.stdout.split()]
    assert paths and all(p.parent == out and p.is_file() for p in paths)
    summaries = []
    for path in (p for p in paths if p.suffix == ".json"):
        summary = json.loads(path.read_text())
        assert path.with_suffix(".png").stat().st_size > 5_000
        with path.with_suffix(".csv").open() as fh:
            summary["rows"] = list(csv.DictReader(fh))
        summaries.append(summary)
    return summaries


def _split_size(run: Path, split: str = "train") -> int:
    with (run / "splits.csv").open() as fh:
        return sum(row["split"] == split for row in csv.DictReader(fh))


def test_default_map_matches_evaluate(run, tmp_path):
    (summary,) = _embed(run, tmp_path)
    rows = summary["rows"]
    n = _split_size(run)
    assert summary["layer"] == "features" and summary["module"] == "backbone" and summary["pool"] == "none"
    assert summary["n_total"] == summary["n_sampled"] == len(rows) == n and summary["sampled"] is False
    assert summary["feature_dim"] > 16 and summary["classes"] == ["NORMAL", "PNEUMONIA"]
    assert 0 <= summary["knn_balanced_accuracy"] <= 1 and summary["projection"]["init"] == "pca"
    for row in rows:
        assert np.isfinite([float(row["x"]), float(row["y"])]).all()
        assert row["correct"] == str(int(row["true"] == row["predicted"]))
    assert summary["misclassified"] == sum(row["correct"] == "0" for row in rows)
    assert {row["predicted"] for row in rows} == {"NORMAL", "PNEUMONIA"}  # so the comparison below means something
    # "misclassified" means what cxr evaluate says: the run's calibrated probabilities and threshold
    result = CliRunner().invoke(app, ["evaluate", str(run), "--split", "train", "--name", "embed-check"])
    assert result.exit_code == 0, result.output
    with (run / "eval" / "embed-check" / "predictions.csv").open() as fh:
        evaluated = {row["source"]: row["predicted"] for row in csv.DictReader(fh)}
    assert {row["source"]: row["predicted"] for row in rows} == evaluated


def test_max_points_samples_stratified_and_seeded(run, tmp_path):
    n = _split_size(run)
    first, again, other = (_embed(run, tmp_path / name, "--max-points", "12", "--seed", seed)[0]
                           for name, seed in (("a", "0"), ("b", "0"), ("c", "1")))
    sources = [[row["source"] for row in s["rows"]] for s in (first, again, other)]
    assert len(sources[0]) == 12 and sources[0] == sources[1] and sources[0] != sources[2]
    assert first["sampled"] is True and first["n_sampled"] == 12 and first["n_total"] == n > 12
    with (run / "splits.csv").open() as fh:
        share = np.mean([row["label"] == "PNEUMONIA" for row in csv.DictReader(fh) if row["split"] == "train"])
    assert abs(sum(row["true"] == "PNEUMONIA" for row in first["rows"]) - 12 * share) <= 1
    assert f"sampled 12 of {n} images (seed 0)" in "\n".join(embedding_titles(first))


def test_conv_layers_and_flatten(run, tmp_path):
    block, head = _embed(run, tmp_path, "--layer", "features.9", "--layer", "head.0")
    assert block["module"] == "backbone.features.9" and block["pool"] == "avg" and len(block["layer_shape"]) == 3
    assert block["feature_dim"] == block["layer_shape"][0] and head["feature_dim"] == 2
    assert [r["source"] for r in block["rows"]] == [r["source"] for r in head["rows"]]  # one forward pass, same rows
    (flat,) = _embed(run, tmp_path, "--layer", "features.9", "--pool", "flatten")
    assert flat["pool"] == "flatten" and flat["feature_dim"] == int(np.prod(flat["layer_shape"]))
    # into the same folder: the flattened map has files of its own, the pooled map's are still there
    found = {p.stem.split("-train-", 1)[1]: p for p in tmp_path.glob("*-train-features_9*.json")}
    assert sorted(found) == ["features_9-flatten-tsne", "features_9-tsne"], found
    assert json.loads(found["features_9-tsne"].read_text())["pool"] == "avg"


def test_umap(run, tmp_path):
    (summary,) = _embed(run, tmp_path, "--method", "umap")
    assert summary["method"] == "umap" and summary["projection"]["n_neighbors"] == min(15, summary["n_sampled"] - 1)
    assert np.isfinite([[float(r["x"]), float(r["y"])] for r in summary["rows"]]).all()


@pytest.mark.parametrize(("args", "message"), [
    (["--layer", "featurs.9"], "has no layer 'featurs.9'; did you mean backbone.features.9"),
    (["--split", "holdout"], "no holdout split"),
    (["--method", "pca"], "unknown method 'pca'"),
    (["--label", "PNEUMONIA"], "--label is for multi-label runs"),
    (["--max-points", "3"], "--max-points 3 is too few"),
])
def test_mistakes_are_one_line_errors(run, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(sys, "argv", ["cxr", "embed", str(run), "--out", str(tmp_path), *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert message in err
    assert not list(tmp_path.iterdir())


def test_stratified_sample_keeps_shares_and_is_seeded():
    classes = np.repeat([0, 1, 2], [500, 300, 200])
    picked = stratified_sample(classes, 100, seed=3)
    assert len(picked) == len(set(picked)) == 100 and np.all(np.diff(picked) > 0)
    assert np.bincount(classes[picked]).tolist() == [50, 30, 20]
    assert np.array_equal(picked, stratified_sample(classes, 100, seed=3))
    assert not np.array_equal(picked, stratified_sample(classes, 100, seed=4))
    assert np.array_equal(stratified_sample(classes[:50], 100, seed=3), np.arange(50))


def test_knn_score_separates_clusters_from_noise():
    rng = np.random.default_rng(0)
    classes = np.repeat([0, 1], 100)
    patients = np.arange(200) // 2  # two images per patient
    clusters = rng.normal(size=(200, 32)) + 4.0 * classes[:, None]
    assert knn_balanced_accuracy(clusters, classes, patients) > 0.9
    noise = knn_balanced_accuracy(clusters, rng.permutation(classes), patients)
    assert 0.35 < noise < 0.65
    assert knn_balanced_accuracy(clusters, classes, np.zeros(200)) is None  # one patient: no honest split
    assert knn_balanced_accuracy(clusters, np.zeros(200, dtype=int), patients) is None


def test_multilabel_view_picks_a_label_and_drops_unknowns():
    labels = ["Effusion", "Mass"]
    targets = np.array([[1, 0], [np.nan, 1], [0, 1], [1, np.nan], [1, 0]], dtype=np.float32)
    view = class_view("multilabel", labels, targets)
    assert view.label == "Effusion" and view.names == ["no Effusion", "Effusion"]
    assert view.true.tolist() == [1, -1, 0, 1, 1]
    assert class_view("multilabel", labels, targets, "mass").true.tolist() == [0, 1, 1, -1, 0]
    with pytest.raises(CxrError, match="unknown label 'Nodule'"):
        class_view("multilabel", labels, targets, "Nodule")


def test_figure_marks_mistakes_with_triangles():
    from matplotlib.markers import MarkerStyle

    def is_marker(collection, marker: str) -> bool:
        style = MarkerStyle(marker)
        expected = style.get_path().transformed(style.get_transform()).vertices
        path = collection.get_paths()[0].vertices
        return path.shape == expected.shape and np.allclose(path, expected)

    rng = np.random.default_rng(1)
    true = np.repeat([0, 1], 20)
    correct = np.ones(40, dtype=bool)
    correct[[3, 25, 30]] = False
    fig = embedding_figure(rng.normal(size=(40, 2)), true, correct, ["NORMAL", "PNEUMONIA"], "t", "s", "t-SNE")
    triangles = [c for c in fig.axes[0].collections if is_marker(c, WRONG_MARKER)]
    dots = [c for c in fig.axes[0].collections if is_marker(c, CORRECT_MARKER)]
    assert [len(c.get_offsets()) for c in triangles] == [1, 2]
    assert [len(c.get_offsets()) for c in dots] == [19, 18]
    assert triangles[0].get_sizes()[0] > dots[0].get_sizes()[0]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["NORMAL: 19 correct", "NORMAL: 1 misclassified", "PNEUMONIA: 18 correct",
                      "PNEUMONIA: 2 misclassified"]
