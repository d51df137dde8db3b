import math

import pytest
import torch
from torch.utils.data import DataLoader

from cxrkit.data.base import DatasetSpec, Item, LabelledImages
from cxrkit.data.dataset import ImageDataset, label_mapping
from cxrkit.data.folder import load_folder
from cxrkit.data.transforms import Preprocessing, build_transform
from cxrkit.errors import CxrError

from .helpers import covid_like

PRE = Preprocessing(size=24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_single_label_samples(tmp_path):
    ds = ImageDataset(load_folder(covid_like(tmp_path / "c")), build_transform(PRE))
    assert len(ds) == 6
    sample = ds[4]
    assert set(sample) == {"image", "target", "index"}
    assert sample["image"].shape == (3, 24, 24)
    assert sample["target"].dtype == torch.int64 and sample["target"].ndim == 0
    assert sample["index"] == 4
    assert ds.data.spec.labels[int(sample["target"])] == "Normal"  # items 3..5 are Normal-*.png
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["target"].tolist() == [1, 1, 1, 0]


def test_a_seeded_key_fixes_the_random_transforms_and_keeps_the_global_random_state(tmp_path):
    """``ds[(index, seed)]`` augments the same way whatever ran before (another worker, another epoch), and the
    caller's random stream (dropout) goes on as if nothing had been drawn."""
    from cxrkit.data.transforms import Augment

    augment = Augment(policy="strong", hflip=True, rotate=10, translate=0.1, scale=(0.9, 1.1), brightness=0.2,
                      contrast=0.2)
    ds = ImageDataset(load_folder(covid_like(tmp_path / "c")), build_transform(PRE, augment))
    torch.manual_seed(0)
    first = ds[(2, 12345)]["image"]
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    ds[(2, 12345)]
    assert torch.equal(torch.rand(3), expected_next)
    torch.manual_seed(99)
    assert torch.equal(ds[(2, 12345)]["image"], first)
    others = [ds[(2, seed)]["image"] for seed in (1, 2, 3)]
    assert not all(torch.equal(other, first) for other in others)
    assert ds[(2, 12345)]["index"] == 2


def test_multilabel_targets_keep_nan(tmp_path):
    from PIL import Image

    items = [Item("a", "a", (1.0, float("nan"))), Item("b", "b", (0.0, 1.0))]
    data = LabelledImages(DatasetSpec("m", "multilabel", ("x", "y")), items, lambda it: Image.new("L", (8, 8)))
    sample = ImageDataset(data, build_transform(PRE))[0]
    assert sample["target"].dtype == torch.float32 and sample["target"].shape == (2,)
    assert sample["target"][0] == 1 and math.isnan(sample["target"][1])


def test_label_mapping_by_name_and_explicit():
    assert label_mapping(["pneumonia", "Normal"], ["NORMAL", "PNEUMONIA"]) == [1, 0]
    assert label_mapping(["Normal", "COVID"], ["NORMAL", "PNEUMONIA"], {"COVID": "PNEUMONIA"}) == [0, 1]
    assert label_mapping(["normal", "viral"], ["normal", "COVID-19", "viral"]) == [0, 2]


def test_unmappable_labels_list_both_sets():
    with pytest.raises(
        CxrError,
        match=r"cannot map dataset labels \['COVID'\].*\['Normal', 'COVID'\].*"
        r"\['NORMAL', 'PNEUMONIA'\]",
    ):
        label_mapping(["Normal", "COVID"], ["NORMAL", "PNEUMONIA"])
    with pytest.raises(CxrError, match="label mapping 'COVID' -> 'Flu' does not match"):
        label_mapping(["Normal", "COVID"], ["NORMAL", "PNEUMONIA"], {"COVID": "Flu"})
