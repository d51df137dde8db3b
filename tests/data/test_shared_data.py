"""Integration tests on the real data in ``$CXR_SHARED/data``; skipped when it is absent."""

import numpy as np
import pytest

from cxrkit.data.combine import combine
from cxrkit.data.csv import load_csv
from cxrkit.data.folder import load_folder
from cxrkit.data.medmnist import load_medmnist
from cxrkit.data.splits import assign_splits

pytestmark = pytest.mark.shared


def _no_patient_overlap(ds, splits):
    patients = {name: {ds.items[i].patient for i in idx} for name, idx in splits.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]


def test_kermany_folder(shared_data):
    ds = load_folder(shared_data / "chest_xray")
    assert ds.spec.labels == ("NORMAL", "PNEUMONIA") and ds.spec.task == "binary"
    assert ds.class_counts() == {"NORMAL": 1341, "PNEUMONIA": 3875}
    assert ds.skipped == []
    assert {it.split for it in ds.items} == {"train"}
    im = ds.read(0)
    assert im.mode == "L" and im.size == (224, 224)


def test_kermany_bacterial_viral_and_patient_grouped_split(shared_data):
    ds = load_folder(shared_data / "chest_xray", task="normal-bacterial-viral")
    assert ds.spec.labels == ("NORMAL", "bacterial", "viral")
    assert ds.class_counts() == {"NORMAL": 1341, "bacterial": 2530, "viral": 1345}
    n_patients = len({it.patient for it in ds.items})
    assert n_patients < len(ds) * 0.6  # many patients have several images
    splits = assign_splits(ds, ratios=(0.7, 0.1, 0.2), seed=0)
    assert sum(len(v) for v in splits.values()) == len(ds)
    _no_patient_overlap(ds, splits)
    for name, ratio in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert len(splits[name]) / len(ds) == pytest.approx(ratio, abs=0.02)


def test_pneumoniamnist(shared_data):
    ds = load_medmnist("pneumoniamnist", root=shared_data / "medmnist")
    counts = {s: sum(it.split == s for it in ds.items) for s in ("train", "val", "test")}
    assert counts == {"train": 4708, "val": 524, "test": 624}
    assert ds.spec.labels == ("normal", "pneumonia")
    splits = assign_splits(ds)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4708, 524, 624]
    assert np.asarray(ds.read(len(ds) - 1)).shape == (28, 28)


def test_nih_sample(shared_data):
    ds = load_csv(shared_data / "nih-chestxray14-sample" / "Data_Entry_2017_v2020.csv")
    assert ds.spec.task == "multilabel" and len(ds.spec.labels) == 14
    assert len(ds) == 1000 and ds.skipped == []
    assert len({it.patient for it in ds.items}) == 264
    assert ds.read(0).size == (64, 64)
    splits = assign_splits(ds, ratios=(0.7, 0.1, 0.2))
    _no_patient_overlap(ds, splits)


def test_covid_plus_kermany_viral(shared_data):
    covid = load_folder(shared_data / "covid19-radiography-subset")
    viral = load_folder(shared_data / "chest_xray", task="normal-bacterial-viral", include=["viral"])
    ds = combine([covid, viral], "covid-viral")
    assert ds.spec.labels == ("Normal", "COVID", "viral")
    assert ds.class_counts() == {"Normal": 800, "COVID": 800, "viral": 1345}
    splits = assign_splits(ds, ratios=(0.8, 0.11, 0.09))
    _no_patient_overlap(ds, splits)
    assert ds.read(int(splits["test"][0])).mode == "L"
