"""Fixtures of the export tests."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A copy of the shared tiny run: these tests write exports into it and change its calibration."""
    return Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("copy") / tiny_run.name))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder of six random grayscale PNGs, 48 wide and 56 high."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (56, 48), dtype=np.uint8)).save(folder / f"x{i}.png")
    return folder
