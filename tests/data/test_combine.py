import numpy as np
import pytest

from cxrkit.data.base import DatasetSpec, Item, LabelledImages
from cxrkit.data.combine import combine, select_labels
from cxrkit.data.folder import load_folder
from cxrkit.errors import CxrError

from .helpers import covid_like, kermany_like


def _study5_parts(tmp_path):
    covid = load_folder(covid_like(tmp_path / "covid19"))
    viral = load_folder(kermany_like(tmp_path / "chest_xray"), task="normal-bacterial-viral", include=["viral"])
    return covid, viral


def test_combine_matches_labels_by_name(tmp_path):
    covid, viral = _study5_parts(tmp_path)
    ds = combine([covid, viral], "study5")
    assert ds.spec.labels == ("Normal", "COVID", "viral")
    assert ds.spec.task == "multiclass" and ds.spec.name == "study5"
    assert ds.class_counts() == {"Normal": 3, "COVID": 3, "viral": 2}
    for it in ds.items:
        folder = it.source.split("/")[-2]
        assert ds.spec.labels[it.target] == {"PNEUMONIA": "viral"}.get(folder, folder)


def test_combine_with_rename(tmp_path):
    covid, viral = _study5_parts(tmp_path)
    covid = select_labels(covid, rename={"normal": "normal", "covid": "COVID-19"})
    ds = combine([covid, viral], "study5")
    assert ds.spec.labels == ("normal", "COVID-19", "viral")


def test_first_spelling_wins_and_two_labels_are_binary(tmp_path):
    covid = load_folder(covid_like(tmp_path / "covid19"))
    kermany = load_folder(kermany_like(tmp_path / "chest_xray"), include=["normal"])
    ds = combine([covid, kermany], "normals")
    assert ds.spec.labels == ("Normal", "COVID") and ds.spec.task == "binary"
    assert ds.class_counts() == {"Normal": 9, "COVID": 3}


def test_patients_are_prefixed_per_dataset_and_splits_cleared(tmp_path):
    covid, viral = _study5_parts(tmp_path)
    assert {it.split for it in viral.items} == {"train"}
    ds = combine([covid, viral], "study5")
    patients = {it.patient for it in ds.items}
    assert "covid19:COVID-1" in patients and "chest_xray:person2" in patients
    assert {it.split for it in ds.items} == {None}  # only one part had its own splits


def test_same_dataset_parts_keep_patient_ids_and_splits(tmp_path):
    root = kermany_like(tmp_path / "k")
    a = load_folder(root, include=["normal"])
    b = load_folder(root, include=["pneumonia"])
    ds = combine([a, b], "k")
    assert "IM-0001" in {it.patient for it in ds.items}
    assert {it.split for it in ds.items} == {"train"}


def test_reader_dispatches_to_each_part_even_after_subset(tmp_path):
    covid = load_folder(covid_like(tmp_path / "covid19", size=16))
    other = LabelledImages(
        DatasetSpec("synthetic", "multiclass", ("viral",)),
        [Item("mem://0", "p0", 0), Item("mem://1", "p1", 0)],
        lambda item: _constant(int(item.source[-1]) + 7),
    )
    ds = combine([covid, other], "mixed")
    sub = ds.subset([len(ds) - 1, 0])
    assert np.asarray(sub.read(0)).max() == 8  # from the synthetic part's reader
    assert sub.read(1).size == (16, 16)  # from the folder part's reader
    relabelled = select_labels(ds, rename={"viral": "virus"})
    assert np.asarray(relabelled.read(len(relabelled) - 1)).max() == 8


def _constant(value: int):
    from PIL import Image

    return Image.new("L", (4, 4), value)


def test_duplicate_sources_are_left_out(tmp_path):
    covid = load_folder(covid_like(tmp_path / "covid19"))
    ds = combine([covid, load_folder(tmp_path / "covid19", name="again")], "dup")
    assert len(ds) == 6
    assert len([why for _, why in ds.skipped if why.startswith("duplicate")]) == 6
    (tmp_path / "linked").symlink_to(tmp_path / "covid19")  # the same files by another path: still duplicates
    ds = combine([covid, load_folder(tmp_path / "linked", name="linked")], "dup")
    assert len(ds) == 6 and len([why for _, why in ds.skipped if why.startswith("duplicate")]) == 6


def test_combine_refuses_multilabel_and_empty():
    ml = LabelledImages(DatasetSpec("nih", "multilabel", ("a", "b")), [], lambda item: None)
    with pytest.raises(CxrError, match="cannot combine multilabel"):
        combine([ml], "x")
    with pytest.raises(CxrError, match="nothing to combine"):
        combine([], "x")


def test_select_labels_merges_renamed_labels(tmp_path):
    ds = load_folder(kermany_like(tmp_path / "k"), task="normal-bacterial-viral")
    merged = select_labels(ds, rename={"bacterial": "pneumonia", "viral": "Pneumonia"})
    assert merged.spec.labels == ("NORMAL", "pneumonia") and merged.spec.task == "binary"
    assert merged.class_counts() == {"NORMAL": 6, "pneumonia": 6}
    with pytest.raises(CxrError, match="cannot rename label 'covid'"):
        select_labels(ds, rename={"covid": "x"})


def test_select_labels_multilabel_keeps_items_and_picks_columns():
    nan = float("nan")
    items = [Item("a", "a", (1.0, 0.0, nan)), Item("b", "b", (0.0, nan, 1.0))]
    ds = LabelledImages(DatasetSpec("m", "multilabel", ("x", "y", "z")), items, lambda item: None)
    picked = select_labels(ds, include=["Z", "x"])
    assert picked.spec.labels == ("z", "x") and len(picked) == 2
    assert np.isnan(picked.items[0].target[0]) and picked.items[0].target[1] == 1.0
    merged = select_labels(ds, rename={"y": "x"})
    assert merged.spec.labels == ("x", "z")
    assert [it.target[0] for it in merged.items] == [1.0, 0.0]
