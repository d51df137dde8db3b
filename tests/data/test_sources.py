from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from cxrkit.data.sources import load_dataset
from cxrkit.errors import CxrError

from .helpers import covid_like, kermany_like, medmnist_npz, save_gray


def test_auto_folder_from_a_dict(tmp_path):
    ds = load_dataset({"root": str(kermany_like(tmp_path / "k")), "task": "normal-bacterial-viral"})
    assert ds.spec.labels == ("NORMAL", "bacterial", "viral")


def test_auto_csv_and_include(tmp_path):
    for i in range(3):
        save_gray(tmp_path / f"{i}.png", (8, 8), i)
    (tmp_path / "d.csv").write_text("path,label\n0.png,a\n1.png,b\n2.png,c\n")
    ds = load_dataset({"root": str(tmp_path / "d.csv"), "include": ["a", "c"], "rename": {"c": "z"}})
    assert ds.spec.labels == ("a", "z") and ds.spec.task == "binary" and len(ds) == 2


def test_auto_medmnist_by_npz_path_and_by_name(tmp_path):
    medmnist_npz(tmp_path / "pneumoniamnist_64.npz", {"train": 3}, size=64)
    by_path = load_dataset({"root": str(tmp_path / "pneumoniamnist_64.npz")})
    assert by_path.spec.name == "pneumoniamnist_64" and by_path.read(0).size == (64, 64)
    by_name = load_dataset({"name": "pneumoniamnist", "size": 64, "root": str(tmp_path)})
    assert [it.source for it in by_name.items] == [it.source for it in by_path.items]
    with pytest.raises(CxrError, match="MedMNIST defines task 'binary'"):
        load_dataset({"name": "pneumoniamnist", "size": 64, "root": str(tmp_path), "task": "multilabel"})


def test_combine_with_dict_sources(tmp_path):
    cfg = SimpleNamespace(
        format="combine",
        name="study5",
        root=None,
        sources=[
            {"root": str(covid_like(tmp_path / "covid19")), "rename": {"COVID": "COVID-19", "Normal": "normal"}},
            {"root": str(kermany_like(tmp_path / "k")), "task": "normal-bacterial-viral", "include": ["viral"]},
        ],
    )
    ds = load_dataset(cfg)
    assert ds.spec.name == "study5" and ds.spec.labels == ("normal", "COVID-19", "viral")


def test_object_config_with_some_attributes(tmp_path):
    @dataclass
    class DataConfig:
        root: str
        format: str = "folder"

    ds = load_dataset(DataConfig(root=str(covid_like(tmp_path / "c"))))
    assert ds.spec.labels == ("Normal", "COVID")


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"root": "/no/such/folder"}, "data root /no/such/folder does not exist"),
        ({"format": "folder"}, "needs a 'root'"),
        ({"format": "zip", "root": "."}, "format 'zip' is not one of"),
        ({"format": "combine"}, "needs a non-empty 'sources'"),
        ({"roots": "x"}, r"unknown keys \['roots'\]"),
    ],
)
def test_config_errors(cfg, message):
    with pytest.raises(CxrError, match=message):
        load_dataset(cfg)


def test_a_medmnist_name_as_root_is_found_in_the_data_dir(tmp_path, monkeypatch):
    medmnist_npz(tmp_path / "medmnist" / "pneumoniamnist.npz", {"train": 4, "val": 2, "test": 2})
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    ds = load_dataset({"root": "pneumoniamnist"})
    assert ds.spec.name == "pneumoniamnist" and len(ds) == 8
