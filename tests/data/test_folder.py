import os
from collections import Counter

import numpy as np
import pytest

from cxrkit.data.folder import load_folder, patient_from_filename, pneumonia_cause
from cxrkit.errors import CxrError

from .helpers import covid_like, kermany_like, png_header_only, save_gray, write_dicom


@pytest.mark.parametrize(
    ("filename", "patient"),
    [
        ("person1234_bacteria_5.jpeg", "person1234"),
        ("person1234_virus_5.jpeg", "person1234"),
        ("person447_virus_921_1.jpeg", "person447"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0429-0001-0002.jpeg", "IM-0429"),
        ("NORMAL2-IM-0115-0001.jpeg", "NORMAL2-IM-0115"),
        ("COVID-100.png", "COVID-100"),
        ("Normal-12.png", "Normal-12"),
        ("scan_2020.dcm", "scan_2020"),
    ],
)
def test_patient_from_filename(filename, patient):
    assert patient_from_filename(filename) == patient


@pytest.mark.parametrize(
    ("filename", "cause"),
    [("person1_bacteria_1.jpeg", "bacterial"), ("person1_virus_6.jpeg", "viral"), ("pneumonia-7.jpeg", None)],
)
def test_pneumonia_cause(filename, cause):
    assert pneumonia_cause(filename) == cause


def test_kaggle_layout_with_splits(tmp_path):
    root = kermany_like(tmp_path / "chest_xray", splits=("train", "test"))
    ds = load_folder(root)
    assert ds.spec.task == "binary"
    assert ds.spec.labels == ("NORMAL", "PNEUMONIA")
    assert ds.spec.positive == "PNEUMONIA"
    assert ds.spec.name == "chest_xray"
    assert Counter(it.split for it in ds.items) == {"train": 12, "test": 12}
    assert ds.class_counts() == {"NORMAL": 12, "PNEUMONIA": 12}
    normal = [it for it in ds.items if "IM-0001-0002" in it.source][0]
    assert (normal.patient, normal.target, normal.split) == ("IM-0001", 0, "train")
    assert ds.read(0).mode == "L"


def test_missing_split_folders_are_fine(tmp_path):
    ds = load_folder(kermany_like(tmp_path / "x", splits=("val",)))
    assert {it.split for it in ds.items} == {"val"}


def test_layout_without_split_folders_and_normal_first(tmp_path):
    ds = load_folder(covid_like(tmp_path / "covid"))
    assert ds.spec.labels == ("Normal", "COVID")  # normal-like first even though COVID sorts first
    assert ds.spec.task == "binary"
    assert {it.split for it in ds.items} == {None}
    assert {it.patient for it in ds.items} == {f"{c}-{n}" for c in ("COVID", "Normal") for n in (1, 2, 3)}


def test_more_than_two_classes_is_multiclass_sorted(tmp_path):
    for cls in ("Viral Pneumonia", "COVID", "Lung_Opacity", "Normal"):
        save_gray(tmp_path / "db" / cls / f"{cls}-1.png", (8, 8))
    ds = load_folder(tmp_path / "db")
    assert ds.spec.task == "multiclass"
    assert ds.spec.labels == ("Normal", "COVID", "Lung_Opacity", "Viral Pneumonia")


def test_class_folders_named_with_spaces_at_either_end_keep_their_images(tmp_path):
    """A folder " Normal " was a label that find_label could not find again: every item's target was None."""
    for n in range(2):
        save_gray(tmp_path / "db" / " Normal " / f"n-{n}.png", (8, 8), n)
        save_gray(tmp_path / "db" / "COVID" / f"c-{n}.png", (8, 8), 10 + n)
    ds = load_folder(tmp_path / "db")
    assert ds.spec.labels == (" Normal ", "COVID")
    assert ds.targets().tolist() == [0, 0, 1, 1]  # " Normal " sorts first


@pytest.mark.parametrize("other", ["viral", " Viral"])
def test_class_folders_side_by_side_that_differ_only_in_case_or_spaces_are_refused(tmp_path, other):
    """They were merged into one class without a word: a three-class dataset trained as binary."""
    for n, cls in enumerate(("NORMAL", "Viral", other)):
        save_gray(tmp_path / "db" / "train" / cls / f"x-{n}.png", (8, 8), n)
    first, second = sorted([other, "Viral"])
    with pytest.raises(CxrError, match=rf"db/train: class folders '{first}' and '{second}' differ only in case or "
                                       r"spaces, and would be read as one class; merge or rename them"):
        load_folder(tmp_path / "db")


def test_normal_bacterial_viral_finds_a_pneumonia_folder_with_spaces_around_its_name(tmp_path):
    """`` Pneumonia`` in test stayed a fourth class, and the test split had no bacterial or viral image."""
    root = kermany_like(tmp_path / "x", splits=("train", "test"))
    (root / "test" / "PNEUMONIA").rename(root / "test" / " Pneumonia")
    ds = load_folder(root, task="normal-bacterial-viral")
    assert ds.spec.labels == ("NORMAL", "bacterial", "viral")
    assert Counter(ds.spec.labels[it.target] for it in ds.items if it.split == "test") == {
        "NORMAL": 6, "bacterial": 4, "viral": 2}


def test_the_same_class_in_two_split_folders_may_differ_in_case(tmp_path):
    save_gray(tmp_path / "db" / "train" / "Viral" / "x.png", (8, 8))
    save_gray(tmp_path / "db" / "train" / "NORMAL" / "y.png", (8, 8), 1)
    save_gray(tmp_path / "db" / "test" / "viral" / "z.png", (8, 8), 2)
    save_gray(tmp_path / "db" / "test" / "normal" / "w.png", (8, 8), 3)
    assert load_folder(tmp_path / "db").spec.labels == ("normal", "viral")  # as the first split folder spells them


def test_names_that_outputs_cannot_hold_are_skipped_by_the_scan_with_the_reason(tmp_path):
    """A file name that is not UTF-8 crashed training (hashing it for the image cache); one with a carriage return
    split its row of splits.csv in two, and the finished run could not be evaluated."""
    root = tmp_path / "db"
    for n in range(2):
        save_gray(root / "NORMAL" / f"n-{n}.png", (8, 8), n)
        save_gray(root / "COVID" / f"c-{n}.png", (8, 8), 10 + n)
    save_gray(root / "NORMAL" / os.fsdecode(b"bad\xff.png"), (8, 8), 20)
    save_gray(root / "NORMAL" / "cr\rx.png", (8, 8), 21)
    save_gray(root / os.fsdecode(b"odd\xffclass") / "o.png", (8, 8), 22)
    ds = load_folder(root)
    assert ds.spec.labels == ("NORMAL", "COVID") and len(ds.items) == 4
    assert sorted(ds.skipped) == [
        (f"{root}/NORMAL/bad\\xff.png", "its name is not valid UTF-8; rename it"),
        (f"{root}/NORMAL/cr\\rx.png", "its name holds a control character; rename it"),
        (f"{root}/odd\\xffclass", "class folder ignored: its name is not valid UTF-8; rename it"),
    ]


def test_normal_bacterial_viral(tmp_path):
    root = kermany_like(tmp_path / "k")
    save_gray(root / "train" / "PNEUMONIA" / "pneumonia-unknown-1.jpeg", (8, 8))
    ds = load_folder(root, task="normal-bacterial-viral")
    assert ds.spec.task == "multiclass"
    assert ds.spec.labels == ("NORMAL", "bacterial", "viral")
    assert ds.class_counts() == {"NORMAL": 6, "bacterial": 4, "viral": 2}
    for it in ds.items:
        name = it.source.rsplit("/", 1)[-1]
        expected = "bacterial" if "_bacteria_" in name else "viral" if "_virus_" in name else "NORMAL"
        assert ds.spec.labels[it.target] == expected
    assert [reason for src, reason in ds.skipped if "pneumonia-unknown-1" in src] == [
        "cannot tell bacterial from viral: no '_bacteria_' or '_virus_' in name"
    ]


def test_normal_bacterial_viral_needs_a_pneumonia_folder(tmp_path):
    with pytest.raises(CxrError, match="needs a PNEUMONIA class folder"):
        load_folder(covid_like(tmp_path / "c"), task="normal-bacterial-viral")


def test_include_and_rename(tmp_path):
    root = kermany_like(tmp_path / "k")
    viral = load_folder(root, task="normal-bacterial-viral", include=["viral"])
    assert viral.spec.labels == ("viral",) and len(viral) == 2
    assert all(it.target == 0 for it in viral.items)
    renamed = load_folder(root, rename={"pneumonia": "sick"})
    assert renamed.spec.labels == ("NORMAL", "sick") and renamed.spec.task == "binary"
    with pytest.raises(CxrError, match=r"label 'covid' is not in the dataset's labels \['NORMAL', 'PNEUMONIA'\]"):
        load_folder(root, include=["covid"])


def test_scan_skips_and_reports_non_images(tmp_path):
    root = covid_like(tmp_path / "c")
    cls = root / "COVID"
    (cls / "notes.txt").write_text("hello")
    (cls / ".DS_Store").write_bytes(b"\0" * 10)
    (cls / "Thumbs.db").write_bytes(b"\0" * 10)
    (cls / "empty.png").write_bytes(b"")
    (cls / "fake.jpeg").write_text("not really a jpeg")
    (cls / "more" / "deeper").mkdir(parents=True)
    for name in ("a.png", "deeper/b.png"):  # a nested folder: its count of files says what is lost
        (cls / "more" / name).write_bytes(b"x")
    (root / "stray.png").write_bytes(b"x")  # no class folder: no class
    (root / "README.md").write_text("about the data")  # not an image: not worth a line
    ds = load_folder(root)
    reasons = {src.rsplit("/", 1)[-1]: why for src, why in ds.skipped}
    assert reasons == {
        "notes.txt": "not an image file extension (.txt)",
        ".DS_Store": "hidden or system file",
        "Thumbs.db": "hidden or system file",
        "empty.png": "empty file",
        "fake.jpeg": "not an image (unrecognised content)",
        "more": "nested folder ignored (2 files in it)",
        "stray.png": "image outside a class folder ignored (it has no class)",
    }
    assert len(ds) == 6
    unchecked = load_folder(root, check=False)
    assert len(unchecked) == 8  # empty.png and fake.jpeg pass a scan without content checks ...
    bad = next(i for i, it in enumerate(unchecked.items) if it.source.endswith("fake.jpeg"))
    with pytest.raises(CxrError, match=r"fake\.jpeg: not an image"):  # ... and fail, named, when read
        unchecked.read(bad)


@pytest.mark.filterwarnings("error")  # the scan checks sizes itself: no DecompressionBombWarning may escape it
def test_files_whose_header_rules_them_out_are_skipped_by_the_scan(tmp_path):
    import pydicom

    root = covid_like(tmp_path / "c")
    cls = root / "COVID"
    ramp = np.arange(64, dtype=np.uint16).reshape(8, 8)
    write_dicom(cls / "single.dcm", ramp)
    write_dicom(cls / "frames.dcm", np.stack([ramp, ramp]), NumberOfFrames=2)
    nopix = pydicom.dcmread(write_dicom(cls / "nopix.dcm", ramp))
    del nopix.PixelData
    nopix.save_as(cls / "nopix.dcm")
    png_header_only(cls / "huge.png", 10000, 10000)  # over Pillow's warning threshold (89 megapixels) too
    # these three used to pass the scan and stop training when decoded
    large = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)  # 8 KiB: read deferred, as a real image is
    cut = write_dicom(cls / "cut.dcm", large)
    cut.write_bytes(cut.read_bytes()[:-3000])
    write_dicom(cls / "declared.dcm", large, Rows=128)  # the header declares twice the pixels the file holds
    write_dicom(cls / "window.dcm", large, WindowCenter=100, WindowWidth=0)
    ds = load_folder(root)
    reasons = {src.rsplit("/", 1)[-1]: why for src, why in ds.skipped}
    assert reasons == {
        "frames.dcm": "multi-frame DICOM (2 frames) is not supported; export a single frame",
        "nopix.dcm": "DICOM file has no pixel data (cut short, or a DICOM object that is not an image)",
        "huge.png": "image is 10000x10000 (100 megapixels), over the limit of 64 megapixels",
        "cut.dcm": "truncated DICOM file (its pixel data needs 8192 bytes, the file ends after 5192)",
        "declared.dcm": "DICOM pixel data is 8192 bytes, but 64x128 pixels of 16 bits need 16384 (a damaged file or "
                        "header)",
        "window.dcm": "invalid DICOM LUT or window attributes (The (0028,1051) Window Width must be greater than or "
                      "equal to 1 for a 'LINEAR' windowing operation)",
    }
    assert len(ds) == 7 and any(it.source.endswith("single.dcm") for it in ds.items)
    write_dicom(cls / "large.dcm", large)  # and a sound 8 KiB DICOM passes
    assert len(load_folder(root)) == len(ds) + 1


def test_truncated_file_is_skipped_by_the_scan(tmp_path):
    root = covid_like(tmp_path / "c")
    path = root / "COVID" / "COVID-1.png"
    path.write_bytes(path.read_bytes()[:60])
    ds = load_folder(root)
    assert str(path) not in {it.source for it in ds.items}
    assert dict(ds.skipped)[str(path)].startswith("truncated PNG")


def test_corrupt_file_fails_at_read_time_naming_it(tmp_path):
    root = covid_like(tmp_path / "c")
    path = root / "COVID" / "COVID-1.png"
    data = path.read_bytes()
    path.write_bytes(data[:60] + b"\x00" * 16 + data[-12:])  # complete header and end chunk, broken inside
    ds = load_folder(root)
    index = next(i for i, it in enumerate(ds.items) if it.source == str(path))
    with pytest.raises(CxrError, match=r"COVID-1\.png: corrupt"):
        ds.read(index)
    assert np.asarray(ds.read(index + 1)).shape == (16, 16)


def test_task_errors(tmp_path):
    root = kermany_like(tmp_path / "k")
    with pytest.raises(CxrError, match="'binary' needs exactly 2 labels"):
        load_folder(root, task="binary", include=["NORMAL"])
    with pytest.raises(CxrError, match="task 'multilabel' is not possible"):
        load_folder(root, task="multilabel")
    assert load_folder(root, task="multiclass").spec.task == "multiclass"


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(CxrError, match=r"data root .*nowhere does not exist"):
        load_folder(tmp_path / "nowhere")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(CxrError, match="no images found"):
        load_folder(tmp_path / "empty")


def test_no_images_names_a_dataset_one_level_down(tmp_path):
    root = kermany_like(tmp_path / "data" / "chest_xray")
    with pytest.raises(CxrError, match=rf"no images found .*; did you mean {root}\?$"):
        load_folder(tmp_path / "data")
    assert len(load_folder(root)) > 0
    (tmp_path / "other" / "notes").mkdir(parents=True)  # nothing usable below: no hint
    with pytest.raises(CxrError, match=r"<class>/\*\)$"):
        load_folder(tmp_path / "other")
