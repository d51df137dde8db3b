"""The on-disk feature store: memory-mapped when large, complete or absent, and the same numbers either way."""

import json

import pytest
import torch
from failedwrites import FAILED_WRITES, can_allocate, fail_writes
from torch.utils.data import DataLoader

from cxrkit import cache
from cxrkit.train import features
from cxrkit.train.features import extract_features
from cxrkit.train.runtime import setup_runtime


class Images(torch.utils.data.Dataset):
    def __init__(self, n=10, labels=2):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.labels = labels

    def __len__(self):
        return len(self.x)

    def targets(self):  # what ImageDataset gives: a reused entry's targets come from here
        return torch.arange(len(self.x)) % self.labels

    def __getitem__(self, i):
        return {"image": self.x[i], "target": self.targets()[i]}


NET = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3), torch.nn.Flatten())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stored_features_equal_the_ones_kept_in_memory(tmp_path, monkeypatch, precision):
    runtime = setup_runtime("cpu", precision, channels_last=False, workers=0)
    loader = DataLoader(Images(), batch_size=4)
    plain = extract_features(NET, loader, runtime, boundary="2")  # the input of the second convolution
    stored = extract_features(NET, loader, runtime, boundary="2", store=tmp_path / "f.bin")
    assert not stored.mapped and torch.equal(stored.features, plain.features)
    assert stored.features.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert torch.equal(stored.targets, plain.targets)
    # too large for memory: the same numbers, memory-mapped from the file
    monkeypatch.setattr(features, "MEMORY_SHARE", 0.0)
    mapped = extract_features(NET, loader, runtime, boundary="2", store=tmp_path / "f.bin")
    assert mapped.mapped and torch.equal(mapped.features, plain.features)
    assert json.loads((tmp_path / "f.json").read_text())["shape"] == [10, 4, 14, 14]


def test_an_interrupted_pass_leaves_no_cache(tmp_path):
    runtime = setup_runtime("cpu", "fp32", channels_last=False, workers=0)

    class Broken(Images):
        def __getitem__(self, i):
            if i == 7:
                raise KeyboardInterrupt
            return super().__getitem__(i)

    with pytest.raises(KeyboardInterrupt):
        extract_features(NET, DataLoader(Broken(), batch_size=4), runtime, store=tmp_path / "f.bin")
    assert not list(tmp_path.iterdir())


def test_features_stay_in_memory_when_the_disk_has_no_room(tmp_path, monkeypatch):
    """A memory-mapped write to a full disk kills the process with SIGBUS, so a store that does not fit is not
    started."""
    runtime = setup_runtime("cpu", "fp32", channels_last=False, workers=0)
    loader = DataLoader(Images(), batch_size=4)
    plain = extract_features(NET, loader, runtime, boundary="2")
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    notes = []
    kept = extract_features(NET, loader, runtime, boundary="2", store=tmp_path / "f.bin", log=notes.append)
    assert torch.equal(kept.features, plain.features) and not kept.mapped
    assert notes == [f"features stay in memory: they need 30.6 KiB, {tmp_path} has 1000 B free"]  # not "0 MiB"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["json", "short"])
def test_a_damaged_entry_is_computed_again(tmp_path, damage):
    runtime = setup_runtime("cpu", "fp32", channels_last=False, workers=0)
    loader = DataLoader(Images(), batch_size=4)
    first = extract_features(NET, loader, runtime, boundary="2", store=tmp_path / "f.bin")
    if damage == "json":
        (tmp_path / "f.json").write_text('{"shape": [10, 4')  # cut short
    else:
        (tmp_path / "f.bin").write_bytes((tmp_path / "f.bin").read_bytes()[:100])
    assert features.stored_meta(tmp_path / "f.bin") is None and not (tmp_path / "f.json").exists()
    again = extract_features(NET, loader, runtime, boundary="2", store=tmp_path / "f.bin")
    assert torch.equal(again.features, first.features) and features.stored_meta(tmp_path / "f.bin") is not None


def test_a_reused_entry_takes_the_labels_of_this_loader(tmp_path):
    """Features do not depend on labels, so an entry is reused by a run that labels the same images otherwise (a
    renamed class, another task); the targets must be that run's, in the loader's order, not the first run's."""
    runtime = setup_runtime("cpu", "fp32", channels_last=False, workers=0)
    first = extract_features(NET, DataLoader(Images(labels=2), batch_size=4), runtime, store=tmp_path / "f.bin")
    assert torch.equal(first.targets, torch.arange(10) % 2)
    reused = extract_features(NET, DataLoader(Images(labels=3), batch_size=4), runtime, store=tmp_path / "f.bin")
    assert torch.equal(reused.features, first.features)
    assert torch.equal(reused.targets, torch.arange(10) % 3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("failure", FAILED_WRITES, ids=list(FAILED_WRITES))
def test_features_stay_in_memory_when_their_entry_cannot_be_written(tmp_path, monkeypatch, failure, precision):
    """A failed write keeps the features in memory, as too little free space does: the same numbers, a note, no
    traceback, and nothing left in the cache folder."""
    runtime = setup_runtime("cpu", precision, channels_last=False, workers=0)
    loader = DataLoader(Images(), batch_size=4)
    plain = extract_features(NET, loader, runtime, boundary="2")
    reason = fail_writes(monkeypatch, failure)
    notes = []
    kept = extract_features(NET, loader, runtime, boundary="2", store=tmp_path / "f.bin", log=notes.append)
    assert not kept.mapped and torch.equal(kept.features, plain.features) and torch.equal(kept.targets, plain.targets)
    assert notes == [f"features stay in memory: cannot write {tmp_path} ({reason})"]
    assert not list(tmp_path.iterdir())  # no .tmp, and no .bin without its .json


def test_the_feature_file_has_its_disk_space_before_features_are_written(tmp_path):
    """Another process cannot take the space while the features are written: a write into a mapping with no space
    behind it would end the process with SIGBUS."""
    if not can_allocate(tmp_path):
        pytest.skip("this filesystem cannot allocate space ahead")
    seen = []

    class Watched(Images):
        def __getitem__(self, i):
            if i == 4:  # the second batch: the file was made for the first
                seen.extend((p.stat().st_size, p.stat().st_blocks * 512) for p in tmp_path.glob("*.tmp"))
            return super().__getitem__(i)

    runtime = setup_runtime("cpu", "fp32", channels_last=False, workers=0)
    stored = extract_features(NET, DataLoader(Watched(), batch_size=4), runtime, boundary="2", store=tmp_path / "f.bin")
    assert stored.features.shape == (10, 4, 14, 14)
    [(size, allocated)] = seen
    assert size == 10 * 4 * 14 * 14 * 4 and allocated >= size
