import numpy as np
import pytest

from cxrkit.data.medmnist import load_medmnist, npz_filename
from cxrkit.errors import CxrError

from .helpers import medmnist_npz

COUNTS = {"train": 5, "val": 2, "test": 3}


def test_load_by_name_from_root(tmp_path):
    path = medmnist_npz(tmp_path / "pneumoniamnist.npz", COUNTS)
    ds = load_medmnist("pneumoniamnist", root=tmp_path)
    assert ds.spec.task == "binary"
    assert ds.spec.labels == ("normal", "pneumonia")
    assert len(ds) == 10
    assert [it.split for it in ds.items] == ["train"] * 5 + ["val"] * 2 + ["test"] * 3
    item = ds.items[6]
    assert item.source == f"{path}#val/1"
    assert item.patient == item.source  # MedMNIST has no patient ids
    assert item.target == 1
    im = ds.read(6)
    assert im.mode == "L" and im.size == (28, 28)
    assert np.asarray(im).max() == 1  # image 1 of the val split is filled with 1
    assert np.asarray(ds.read(4)).max() == 4


def test_root_from_environment_and_size_suffix(tmp_path, monkeypatch):
    medmnist_npz(tmp_path / "pneumoniamnist_64.npz", {"train": 2}, size=64)
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    ds = load_medmnist("PneumoniaMNIST", size=64)
    assert ds.spec.name == "pneumoniamnist_64"
    assert ds.read(1).size == (64, 64)
    assert npz_filename("chestmnist", 28) == "chestmnist.npz"


def test_root_may_be_the_npz_file(tmp_path):
    path = medmnist_npz(tmp_path / "copy.npz", COUNTS)
    assert len(load_medmnist("pneumoniamnist", root=path)) == 10


def test_multilabel_chestmnist(tmp_path):
    medmnist_npz(tmp_path / "chestmnist.npz", {"train": 4, "test": 2}, n_labels=14, multilabel=True)
    ds = load_medmnist("chestmnist", root=tmp_path)
    assert ds.spec.task == "multilabel"
    assert len(ds.spec.labels) == 14 and ds.spec.labels[0] == "atelectasis"
    assert ds.targets().shape == (6, 14)
    assert all(isinstance(it.target, tuple) for it in ds.items)


def test_missing_file_says_where_to_put_it(tmp_path):
    with pytest.raises(CxrError) as err:
        load_medmnist("pneumoniamnist", size=128, root=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "pneumoniamnist_128.npz") in message
    assert "zenodo" in message.lower() and "download=True" in message and "internet" in message
    assert "\n" not in message


def test_unknown_name_and_size(tmp_path):
    with pytest.raises(CxrError, match="not a 2-D MedMNIST dataset; known: .*pneumoniamnist"):
        load_medmnist("lungmnist", root=tmp_path)
    with pytest.raises(CxrError, match="size 32 is not available"):
        load_medmnist("pneumoniamnist", size=32, root=tmp_path)


def test_npz_without_medmnist_keys(tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", x=np.zeros(3))
    with pytest.raises(CxrError, match=r"pneumoniamnist\.npz: no '<split>_images'"):
        load_medmnist("pneumoniamnist", root=tmp_path)


def test_reader_pickles_without_its_arrays(tmp_path):
    import pickle

    medmnist_npz(tmp_path / "pneumoniamnist.npz", COUNTS)
    ds = load_medmnist("pneumoniamnist", root=tmp_path)
    ds.read(0)
    clone = pickle.loads(pickle.dumps(ds.reader))
    assert clone._arrays == {}  # a DataLoader worker reloads lazily
    assert np.asarray(clone(ds.items[3])).max() == 3
