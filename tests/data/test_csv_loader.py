import math

import pytest

from cxrkit.data.csv import NIH_FINDINGS, load_csv
from cxrkit.errors import CxrError

from .helpers import save_gray

NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"


def _nih(tmp_path, image_folder="images"):
    rows = [
        ("00000001_000.png", "Cardiomegaly", 1),
        ("00000001_001.png", "Cardiomegaly|Emphysema", 1),
        ("00000002_000.png", "No Finding", 2),
        ("00000003_000.png", "Effusion|Pleural_Thickening", 3),
        ("00000004_000.png", "Hernia", 4),  # image missing on disk
    ]
    for name, _, _ in rows[:4]:
        save_gray(tmp_path / image_folder / name, (8, 8))
    lines = [f"{n},{f},0,{p},50,M,PA\n" for n, f, p in rows]
    path = tmp_path / "Data_Entry_2017_v2020.csv"
    path.write_text(NIH_HEADER + "".join(lines))
    return path


def test_nih_format_is_detected_and_multilabel(tmp_path):
    ds = load_csv(_nih(tmp_path))
    assert ds.spec.task == "multilabel"
    assert ds.spec.labels == NIH_FINDINGS and len(NIH_FINDINGS) == 14
    assert len(ds) == 4
    t = {it.source.rsplit("/", 1)[-1]: it.target for it in ds.items}
    lab = ds.spec.labels.index
    assert t["00000001_001.png"][lab("Cardiomegaly")] == 1 and t["00000001_001.png"][lab("Emphysema")] == 1
    assert sum(t["00000001_001.png"]) == 2
    assert sum(t["00000002_000.png"]) == 0  # No Finding: all zeros
    assert t["00000003_000.png"][lab("Pleural_Thickening")] == 1
    assert [it.patient for it in ds.items] == ["1", "1", "2", "3"]
    assert ds.skipped == [("00000004_000.png", "image file not found (Data_Entry_2017_v2020.csv line 6)")]
    assert ds.read(0).mode == "L"


def test_nih_rows_with_unknown_or_no_findings_or_listed_again_are_skipped_with_their_line(tmp_path):
    """A misspelt finding, or a blank Finding Labels, used to read as "no finding" (every label negative), and an
    image listed twice became two items. "No Finding" with a finding was read as that finding, without a word."""
    path = _nih(tmp_path)
    for name in ("00000005_000.png", "00000006_000.png", "00000007_000.png"):
        save_gray(tmp_path / "images" / name, (8, 8))
    path.write_text(path.read_text() + "00000005_000.png,Pneumonai|Nodule,0,5,50,M,PA\n"
                    "00000006_000.png,,0,6,50,M,PA\n" "00000001_000.png,Hernia,0,1,50,M,PA\n"
                    "00000007_000.png,No Finding|Effusion,0,7,50,M,PA\n")
    ds = load_csv(path)
    assert len(ds) == 4
    reasons = {source.rsplit("/", 1)[-1]: reason for source, reason in ds.skipped}
    assert reasons["00000005_000.png"] == f"unknown finding 'Pneumonai' ({path.name} line 7)"  # as the file spells it
    assert reasons["00000007_000.png"] == f"'No Finding' together with findings ({path.name} line 10)"
    assert reasons["00000006_000.png"] == f"no Finding Labels ({path.name} line 8)"
    assert reasons["00000001_000.png"] == f"listed again ({path.name} line 9; first on line 2)"


def test_generic_csv_rows_listing_one_file_twice_or_no_path_are_skipped(tmp_path):
    for i in range(4):
        save_gray(tmp_path / "img" / f"{i}.png", (8, 8))
    path = tmp_path / "labels.csv"
    (tmp_path / "img" / "broken.png").write_text("not a png")  # skipped as a folder scan skips it
    path.write_text("path,label\nimg/0.png,a\nimg/1.png,b\nimg/2.png,a\nimg/3.png,b\n"
                    f"{tmp_path}/img/../img/0.png,b\n,a\nimg/broken.png,a\n")
    ds = load_csv(path)
    assert len(ds) == 4 and [reason for _, reason in ds.skipped] == [
        "listed again (labels.csv line 6; first on line 2)", "no image path (labels.csv line 7)",
        "not an image (unrecognised content)"]


@pytest.mark.parametrize("folder", ["", "images_001/images"])
def test_nih_images_beside_the_csv_or_in_original_folders(tmp_path, folder):
    ds = load_csv(_nih(tmp_path, folder))
    assert len(ds) == 4


def test_nih_image_dir_and_label_choice(tmp_path):
    csv_path = _nih(tmp_path / "meta", image_folder="../pixels")
    ds = load_csv(csv_path, image_dir=tmp_path / "pixels", labels=["effusion", "No Finding", "Cardiomegaly"])
    assert ds.spec.labels == ("Effusion", "No Finding", "Cardiomegaly")
    assert [it.target for it in ds.items] == [(0, 0, 1), (0, 0, 1), (0, 1, 0), (1, 0, 0)]
    with pytest.raises(CxrError, match="'Covid' is not an NIH ChestX-ray14 label"):
        load_csv(csv_path, image_dir=tmp_path / "pixels", labels=["Covid"])
    with pytest.raises(CxrError, match="multilabel, not 'binary'"):
        load_csv(csv_path, task="binary")


def test_nih_official_split_lists(tmp_path):
    path = _nih(tmp_path)
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000002_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000003_000.png\n")
    assert [it.split for it in load_csv(path).items] == ["train", "train", "train", "test"]


def test_generic_single_label_csv(tmp_path):
    for i in range(4):
        save_gray(tmp_path / "img" / f"{i}.png", (8, 8), i)
    (tmp_path / "labels.csv").write_text(
        "path,label,patient\nimg/0.png,pneumonia,p1\nimg/1.png,normal,p1\nimg/2.png,Normal,p2\n"
        "img/3.png,,p3\nimg/9.png,normal,p4\n"
    )
    ds = load_csv(tmp_path / "labels.csv")
    assert ds.spec.task == "binary" and ds.spec.labels == ("normal", "pneumonia")
    assert [it.target for it in ds.items] == [1, 0, 0]
    assert [it.patient for it in ds.items] == ["p1", "p1", "p2"]
    assert ds.items[0].source == str(tmp_path / "img" / "0.png")
    assert sorted(why.split(" (")[0] for _, why in ds.skipped) == ["image file not found", "no label"]
    with pytest.raises(CxrError, match="'binary' needs exactly 2 labels"):
        load_csv(tmp_path / "labels.csv", labels=["normal"], task="binary")


def test_generic_multiclass_and_split_column(tmp_path):
    rows = []
    for i, label in enumerate(["covid", "normal", "viral", "covid"]):
        save_gray(tmp_path / f"{i}.png", (8, 8), i)
        rows.append(f"{tmp_path / f'{i}.png'},{label},{'test' if i == 3 else 'train'}\n")
    (tmp_path / "d.csv").write_text("image,class,split\n" + "".join(rows))
    ds = load_csv(tmp_path / "d.csv")
    assert ds.spec.task == "multiclass" and ds.spec.labels == ("normal", "covid", "viral")
    assert [it.split for it in ds.items] == ["train", "train", "train", "test"]
    assert [it.patient for it in ds.items] == [it.source for it in ds.items]  # no patient column: one per image


def test_generic_multilabel_with_unknowns(tmp_path):
    for i in range(3):
        save_gray(tmp_path / f"{i}.png", (8, 8), i)
    (tmp_path / "m.csv").write_text("path,Effusion,Edema\n0.png,1,0\n1.png,,1\n2.png,0,-1\n")
    ds = load_csv(tmp_path / "m.csv")
    assert ds.spec.task == "multilabel" and ds.spec.labels == ("Effusion", "Edema")
    assert ds.items[0].target == (1.0, 0.0)
    assert math.isnan(ds.items[1].target[0]) and ds.items[1].target[1] == 1.0
    assert math.isnan(ds.items[2].target[1])
    only = load_csv(tmp_path / "m.csv", labels=["edema"])
    assert only.spec.labels == ("Edema",) and only.items[1].target == (1.0,)


def test_generic_csv_errors(tmp_path):
    save_gray(tmp_path / "0.png", (8, 8))
    (tmp_path / "bad.csv").write_text("path,Effusion\n0.png,maybe\n")
    with pytest.raises(CxrError, match=r"bad\.csv:2: column 'Effusion' has 'maybe'"):
        load_csv(tmp_path / "bad.csv")
    (tmp_path / "nopath.csv").write_text("picture,label\n0.png,a\n")
    with pytest.raises(CxrError, match=r"nopath\.csv: no image path column"):
        load_csv(tmp_path / "nopath.csv")
    with pytest.raises(CxrError, match="does not exist"):
        load_csv(tmp_path / "missing.csv")
