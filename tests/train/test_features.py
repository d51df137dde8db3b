"""The on-disk feature store: memory-mapped when large, complete or absent, and the same numbers either way."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

from cxrkit.train import features
from cxrkit.train.features import extract_features
from cxrkit.train.runtime import setup_runtime


class Images(torch.utils.data.Dataset):
    def __init__(self, n=10):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, 16, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "target": torch.tensor(i % 2)}


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
