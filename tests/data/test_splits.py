import re

import numpy as np
import pytest

from cxrkit.data.base import DatasetSpec, Item, LabelledImages
from cxrkit.data.splits import assign_splits, check_ratios, load_splits, save_splits
from cxrkit.errors import CxrError


def _dataset(n_patients=200, seed=0, split=None, task="binary"):
    """Patients with 1-5 images each; about 30% positive patients (all their images share the label)."""
    rng = np.random.default_rng(seed)
    items = []
    for p in range(n_patients):
        label = int(rng.random() < 0.3)
        for k in range(rng.integers(1, 6)):
            target = (float(label), float(1 - label)) if task == "multilabel" else label
            items.append(Item(f"/data/p{p}_{k}.png", f"p{p}", target, split))
    labels = ("normal", "pneumonia")
    return LabelledImages(DatasetSpec("synthetic", task, labels), items, lambda item: None)


def _patients(ds, idx):
    return {ds.items[i].patient for i in idx}


def _check_partition(ds, splits):
    all_idx = np.concatenate([splits[s] for s in ("train", "val", "test")])
    assert sorted(all_idx.tolist()) == list(range(len(ds)))  # every item exactly once
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not _patients(ds, splits[a]) & _patients(ds, splits[b]), f"patient in {a} and {b}"


@pytest.mark.parametrize("ratios", [(0.7, 0.1, 0.2), (0.8, 0.11, 0.09), (0.6, 0.2, 0.2), (0.75, 0.25)])
def test_grouped_stratified_splits_have_requested_sizes_and_no_leakage(ratios):
    ds = _dataset()
    splits = assign_splits(ds, ratios=ratios, seed=1)
    _check_partition(ds, splits)
    wanted = dict(zip(("train", "test") if len(ratios) == 2 else ("train", "val", "test"), ratios, strict=True))
    if len(ratios) == 2:
        assert len(splits["val"]) == 0
    y = ds.targets()
    for name, ratio in wanted.items():
        assert len(splits[name]) / len(ds) == pytest.approx(ratio, abs=0.035)
        assert y[splits[name]].mean() == pytest.approx(y.mean(), abs=0.08)  # stratified


def test_ungrouped_splits_may_share_patients_but_partition_items():
    ds = _dataset()
    splits = assign_splits(ds, ratios=(0.5, 0.5), group_by_patient=False)
    assert len(splits["train"]) + len(splits["test"]) == len(ds)
    assert _patients(ds, splits["train"]) & _patients(ds, splits["test"])


def test_seed_makes_splits_reproducible():
    ds = _dataset()
    a, b, c = (assign_splits(ds, seed=s) for s in (3, 3, 4))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


@pytest.mark.parametrize("ratios", [(0.7, 0.2), (0.5, 0.3, 0.3), (1.0,), (0.5, 0.2, 0.2, 0.1), (1.2, -0.2)])
def test_bad_ratios(ratios):
    with pytest.raises(CxrError, match="split ratios"):
        check_ratios(ratios)
    with pytest.raises(CxrError, match="split ratios"):
        assign_splits(_dataset(20), ratios=ratios)


def test_own_splits_are_used_and_missing_ones_carved_from_train():
    train = _dataset(150, split="train")
    test_items = [Item(f"/t/{i}.png", f"t{i}", i % 2, "test") for i in range(30)]
    ds = LabelledImages(train.spec, train.items + test_items, train.reader)
    splits = assign_splits(ds, ratios=(0.7, 0.1, 0.2))
    n_train = len(train)
    assert np.array_equal(splits["test"], np.arange(n_train, len(ds)))  # own test kept as is
    assert splits["val"].max() < n_train  # val carved from own train ...
    assert len(splits["val"]) / n_train == pytest.approx(0.1 / 0.8, abs=0.04)  # ... in proportion 10:70
    _check_partition(ds, splits)


def test_train_only_dataset_gets_val_and_test_carved():
    ds = _dataset(200, split="train")
    splits = assign_splits(ds, ratios=(0.7, 0.1, 0.2))
    _check_partition(ds, splits)
    assert len(splits["test"]) / len(ds) == pytest.approx(0.2, abs=0.03)
    assert len(splits["val"]) / len(ds) == pytest.approx(0.1, abs=0.03)
    ignored = assign_splits(ds, ratios=(0.5, 0.5), use_own=False)
    assert len(ignored["test"]) / len(ds) == pytest.approx(0.5, abs=0.05)


def test_partial_own_splits_are_an_error():
    ds = _dataset(20, split="train")
    ds.items.append(Item("/x.png", "x", 0, None))
    with pytest.raises(CxrError, match="1 of .* items have no split of their own"):
        assign_splits(ds)
    assert sum(len(v) for v in assign_splits(ds, use_own=False).values()) == len(ds)


def test_multilabel_splits_are_grouped():
    ds = _dataset(task="multilabel")
    splits = assign_splits(ds, ratios=(0.6, 0.2, 0.2))
    _check_partition(ds, splits)


def test_one_patient_cannot_be_split():
    ds = LabelledImages(DatasetSpec("one", "binary", ("a", "b")), [Item(f"{i}", "p", i % 2) for i in range(5)], None)
    with pytest.raises(CxrError, match="need at least 2 patients"):
        assign_splits(ds)


def test_save_and_load_splits_round_trip(tmp_path):
    ds = _dataset(50)
    splits = assign_splits(ds)
    path = tmp_path / "runs" / "splits.csv"
    save_splits(path, ds, splits)
    assert b"\r" not in path.read_bytes()  # LF line endings, like every other CSV a run writes
    lines = path.read_text().splitlines()
    assert lines[0] == "source,patient,label,split"
    assert lines[1].split(",")[2] in ("normal", "pneumonia")
    loaded = load_splits(path, ds)
    assert all(np.array_equal(loaded[k], splits[k]) for k in ("train", "val", "test"))
    shuffled = LabelledImages(ds.spec, ds.items[::-1], ds.reader)  # matched by source, not position
    back = load_splits(path, shuffled)
    assert {shuffled.items[i].source for i in back["test"]} == {ds.items[i].source for i in splits["test"]}


def test_load_splits_detects_a_changed_dataset(tmp_path):
    ds = _dataset(50)
    save_splits(tmp_path / "s.csv", ds, assign_splits(ds))
    with pytest.raises(CxrError, match=r"s\.csv: the dataset changed .* 3 sources missing"):
        load_splits(tmp_path / "s.csv", ds.subset(range(3, len(ds))))
    relabelled = [Item(it.source, it.patient, 1 - it.target, it.split) for it in ds.items]
    with pytest.raises(CxrError, match="with a different label"):
        load_splits(tmp_path / "s.csv", LabelledImages(ds.spec, relabelled, ds.reader))


def test_multilabel_labels_are_joined(tmp_path):
    nan = float("nan")
    items = [Item("a", "a", (1.0, 1.0, nan)), Item("b", "b", (0.0, 0.0, 0.0))]
    ds = LabelledImages(DatasetSpec("m", "multilabel", ("x", "y", "z")), items, None)
    save_splits(tmp_path / "m.csv", ds, {"train": np.array([0]), "test": np.array([1])})
    assert tmp_path.joinpath("m.csv").read_text().splitlines()[1:] == ["a,a,x|y,train", "b,b,,test"]
    assert load_splits(tmp_path / "m.csv", ds)["test"].tolist() == [1]


def test_splits_survive_a_moved_data_folder_and_a_relative_root(tmp_path, monkeypatch):
    ds = _dataset(50)
    splits = assign_splits(ds)
    save_splits(tmp_path / "s.csv", ds, splits)

    def moved(prefix: str) -> LabelledImages:
        items = [Item(prefix + it.source[len("/data"):], it.patient, it.target, it.split) for it in ds.items]
        return LabelledImages(ds.spec, items, ds.reader)

    for other in (moved("/mnt/copy/data"), moved("data")):  # another folder; relative to the working directory
        monkeypatch.chdir(tmp_path)
        loaded = load_splits(tmp_path / "s.csv", other)
        assert all(np.array_equal(loaded[k], splits[k]) for k in ("train", "val", "test"))
    with pytest.raises(CxrError, match="3 sources missing"):
        load_splits(tmp_path / "s.csv", moved("/mnt/copy/data").subset(range(3, len(ds))))


def test_a_tiny_balanced_dataset_splits_instead_of_failing_inside_scikit_learn():
    """8 one-image patients per class: more folds than members per class used to raise sklearn's ValueError."""
    items = [Item(f"/data/{label}{i}.png", f"{label}{i}", label, None) for label in (0, 1) for i in range(8)]
    ds = LabelledImages(DatasetSpec("tiny", "binary", ("normal", "pneumonia")), items, lambda item: None)
    splits = assign_splits(ds, ratios=(0.7, 0.1, 0.2), seed=0)
    _check_partition(ds, splits)
    assert all(len(splits[s]) > 0 for s in ("train", "val", "test"))


def test_own_splits_without_training_images_are_an_error():
    ds = _dataset(20, split="test")
    with pytest.raises(CxrError, match=r"its own splits hold no training images \(\d+ test\); .*use_own: false"):
        assign_splits(ds)  # it used to say "cannot split 0 images of 0 patient(s)"
    assert len(assign_splits(ds, use_own=False)["train"])


def test_split_notes_say_what_came_out_other_than_asked():
    from cxrkit.train.prepare import split_notes

    ds = _dataset()
    assert split_notes(ds, assign_splits(ds, ratios=(0.7, 0.1, 0.2)), (0.7, 0.1, 0.2)) == []
    coarse = split_notes(ds, assign_splits(ds, ratios=(0.98, 0.01, 0.01)), (0.98, 0.01, 0.01))
    assert len(coarse) == 1 and re.fullmatch(r"note: the splits came out at val [4-6]%, test [4-6]% of the images, "
                                             r"against 1%, 1% asked: .* steps of 1/20 at the finest", coarse[0])
    assert split_notes(ds, assign_splits(ds, ratios=(0.98, 0.01, 0.01)), (0.98, 0.01, 0.01), carved=False) == []
    no_test = split_notes(ds, assign_splits(ds, ratios=(1.0, 0.0, 0.0)), (1.0, 0.0, 0.0))
    assert len(no_test) == 1 and no_test[0].startswith("note: the test split is empty")
    negatives = np.flatnonzero(ds.targets() == 0)
    positives = np.flatnonzero(ds.targets() == 1)
    splits = {"train": np.concatenate([negatives[:-20], positives]), "val": negatives[-20:-10],
              "test": negatives[-10:]}
    assert split_notes(ds, splits, (0.7, 0.1, 0.2))[-2:] == [
        "note: the val split has no image of pneumonia (10 images), so per-class metrics for it there are undefined",
        "note: the test split has no image of pneumonia (10 images), so per-class metrics for it there are undefined"]
