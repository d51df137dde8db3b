"""The decoded-image cache gives the model exactly the input it would get from the files, and is never stale."""

import errno
import os

import numpy as np
import pytest
import torch
from failedwrites import FAILED_WRITES, can_allocate, fail_writes, failing
from PIL import Image
from synth import kermany_folder

from cxrkit.data.base import LabelledImages
from cxrkit.data.decoded import cache_key, decoded_images
from cxrkit.data.folder import load_folder
from cxrkit.data.transforms import Augment, Preprocessing, build_transform

SQUASH = Preprocessing(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")
CROP = Preprocessing(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bicubic", resize="crop",
                     crop_pct=0.875)


@pytest.fixture
def folder(tmp_path):
    return kermany_folder(tmp_path / "xray", per_class=6, size=57)


def _build(ds, pre, root, log=None):
    notes = []
    cached = decoded_images(ds, pre, workers=0, log=(log or notes.append), root=root)
    return cached, notes


@pytest.mark.parametrize("pre", [SQUASH, CROP], ids=["squash", "crop"])
def test_cached_inputs_equal_the_inputs_from_the_files(folder, tmp_path, pre):
    ds = load_folder(folder)
    cached, notes = _build(ds, pre, tmp_path / "cache")
    assert cached is not None and "decoded 12 images once" in notes[0]
    plain, fast = build_transform(pre), build_transform(pre, resized=True)
    for i in range(len(ds)):
        assert torch.equal(fast(cached.read(i)), plain(ds.read(i)))
    # augmentation runs after the resize, so a seeded augmented input is the same too
    aug = Augment(policy="light", rotate=10, translate=0.1)
    torch.manual_seed(1)
    want = build_transform(pre, aug)(ds.read(3))
    torch.manual_seed(1)
    assert torch.equal(build_transform(pre, aug, resized=True)(cached.read(3)), want)
    # subsets keep their rows
    part = cached.subset([5, 1])
    assert torch.equal(fast(part.read(0)), plain(ds.read(5)))


def test_a_second_run_reuses_the_cache_and_a_changed_image_makes_a_new_one(folder, tmp_path):
    ds = load_folder(folder)
    _, first = _build(ds, SQUASH, tmp_path / "cache")
    _, again = _build(load_folder(folder), SQUASH, tmp_path / "cache")
    assert first and not again  # nothing decoded the second time
    assert len(list((tmp_path / "cache" / "decoded").glob("*.u8"))) == 1

    before = cache_key(ds.items, SQUASH)
    path = ds.items[0].source
    Image.new("L", (57, 57), 255).save(path)
    os.utime(path, ns=(1, 1))
    changed = load_folder(folder)
    assert cache_key(changed.items, SQUASH) != before
    cached, notes = _build(changed, SQUASH, tmp_path / "cache")
    assert notes and torch.equal(cached.read(0), torch.full((1, 32, 32), 255, dtype=torch.uint8))
    # another input size is another cache
    assert cache_key(ds.items, SQUASH) != cache_key(ds.items, CROP)


def test_a_dataset_under_a_folder_whose_name_is_not_utf8_is_cached(tmp_path):
    """Hashing its paths raised UnicodeEncodeError: cxr train crashed before its first epoch."""
    root = kermany_folder(tmp_path / os.fsdecode(b"r\xf6ntgen"), per_class=2, size=32)
    cached, notes = _build(load_folder(root), SQUASH, tmp_path / "cache")
    assert notes and len(cached) == 4 and cached.read(0).shape == (1, 32, 32)


def test_colour_images_turn_the_cache_off_with_a_reason(folder, tmp_path):
    ds = load_folder(folder)
    colour = LabelledImages(ds.spec, ds.items, lambda item: Image.open(item.source).convert("RGB"))
    cached, notes = _build(colour, SQUASH, tmp_path / "cache")
    assert cached is None and "is a colour image" in notes[0]
    assert not list((tmp_path / "cache" / "decoded").glob("*"))


def test_an_interrupted_build_leaves_nothing_to_read(folder, tmp_path):
    ds = load_folder(folder)

    def failing(item):
        if item is ds.items[7]:
            raise KeyboardInterrupt
        return Image.open(item.source).convert("L")

    with pytest.raises(KeyboardInterrupt):
        _build(LabelledImages(ds.spec, ds.items, failing), SQUASH, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "decoded").glob("*"))
    cached, notes = _build(ds, SQUASH, tmp_path / "cache")
    assert cached is not None and notes
    assert np.asarray(cached.read(7)).std() > 0


def test_a_reader_keeps_its_images_when_the_cache_file_is_removed(folder, tmp_path):
    """`cxr cache clear` during training removes the file; the run's reader (and DataLoader workers forked from it)
    keep reading the mapping they have."""
    from torch.utils.data import DataLoader

    from cxrkit.data.dataset import ImageDataset

    cached, _ = _build(load_folder(folder), SQUASH, tmp_path / "cache")
    want = torch.stack([cached.read(i) for i in range(len(cached))])
    for path in (tmp_path / "cache" / "decoded").iterdir():
        path.unlink()
    loader = DataLoader(ImageDataset(cached, build_transform(SQUASH, resized=True)), batch_size=4, num_workers=1)
    got = torch.cat([batch["image"] for batch in loader])
    assert torch.equal(got, torch.stack([build_transform(SQUASH, resized=True)(image) for image in want]))


def test_an_image_that_cannot_be_decoded_is_left_out_and_named(folder, tmp_path):
    """Its header and end marker pass the scan; its pixel data does not decode. The build decodes every image, so it
    is found there, left out and reported, and every later use of the cache leaves it out too."""
    broken = folder / "train" / "NORMAL" / "IM-1000-0002.png"  # sorts third
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (57, 57), dtype=np.uint8)).save(broken)
    data = broken.read_bytes()
    broken.write_bytes(data[:60] + b"\x00" * 16 + data[-12:])  # complete header and end chunk, broken inside
    broken = str(broken)
    ds = load_folder(folder)
    assert ds.items[2].source == broken and not ds.skipped  # the scan cannot tell
    for attempt in ("build", "reuse"):
        cached, notes = _build(ds, SQUASH, tmp_path / "cache")
        assert cached is not None, attempt
        assert [it.source for it in cached.items] == [it.source for it in ds.items if it.source != broken]
        assert [source for source, _ in cached.skipped] == [broken]
        assert "corrupt" in cached.skipped[0][1] and broken not in cached.skipped[0][1]  # the reason alone
        assert notes == (["decoded 12 images once into " + notes[0].split(" into ")[1]] if attempt == "build" else [])
        plain, fast = build_transform(SQUASH), build_transform(SQUASH, resized=True)
        assert torch.equal(fast(cached.read(2)), plain(ds.read(3)))  # the rows after it are the right images


@pytest.mark.parametrize("failure", FAILED_WRITES, ids=list(FAILED_WRITES))
def test_a_cache_that_cannot_be_written_is_turned_off_with_a_note(folder, tmp_path, monkeypatch, failure):
    """A failed write turns the cache off, as too little free space does: no traceback, nothing left behind. The
    .json's write raises the CxrError of an atomic write, which is a failed write too."""
    reason = fail_writes(monkeypatch, failure)
    ds = load_folder(folder)
    cached, notes = _build(ds, SQUASH, tmp_path / "cache")
    decoded = tmp_path / "cache" / "decoded"
    assert cached is None and notes == [f"decoded-image cache off: cannot write {decoded} ({reason})"]
    assert not list(decoded.iterdir())  # no .tmp, and no .u8 without its .json
    monkeypatch.undo()  # the disk has room again: built as if nothing had happened
    cached, notes = _build(ds, SQUASH, tmp_path / "cache")
    assert cached is not None and "decoded 12 images once" in notes[0]
    plain, fast = build_transform(SQUASH), build_transform(SQUASH, resized=True)
    assert all(torch.equal(fast(cached.read(i)), plain(ds.read(i))) for i in range(len(ds)))


def test_a_cache_that_would_nearly_fill_the_disk_is_not_built(folder, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10_000})())
    cached, notes = _build(load_folder(folder), SQUASH, tmp_path / "cache")
    decoded = tmp_path / "cache" / "decoded"
    assert cached is None and notes == [f"decoded-image cache off: it needs 12.0 KiB, {decoded} has 9.8 KiB free"]
    assert not list(decoded.iterdir())


def test_an_error_that_is_not_a_failed_write_is_not_turned_into_a_note(folder, tmp_path):
    ds = load_folder(folder)

    def failing(item):
        if item is ds.items[3]:
            raise OSError(errno.EIO, "Input/output error", item.source)
        return Image.open(item.source).convert("L")

    with pytest.raises(OSError, match="Input/output error"):
        _build(LabelledImages(ds.spec, ds.items, failing), SQUASH, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "decoded").iterdir())


def test_the_cache_file_has_its_disk_space_before_the_first_image_is_written(folder, tmp_path):
    """Another process cannot take the space while the images are written: a write into a mapping with no space
    behind it would end the process with SIGBUS."""
    if not can_allocate(tmp_path):
        pytest.skip("this filesystem cannot allocate space ahead")
    ds = load_folder(folder)
    seen = []

    def reading(item):
        if not seen:
            seen.extend((p.stat().st_size, p.stat().st_blocks * 512) for p in (tmp_path / "cache" / "decoded")
                        .glob("*.tmp"))
        return Image.open(item.source).convert("L")

    cached, _ = _build(LabelledImages(ds.spec, ds.items, reading), SQUASH, tmp_path / "cache")
    assert cached is not None
    [(size, allocated)] = seen
    assert size == 12 * 32 * 32 and allocated >= size


@pytest.mark.parametrize("unsupported", ["system", "filesystem"])
def test_the_cache_is_built_where_space_cannot_be_allocated_ahead(folder, tmp_path, monkeypatch, unsupported):
    if unsupported == "system":
        monkeypatch.delattr(os, "posix_fallocate")  # macOS
    else:
        monkeypatch.setattr(os, "posix_fallocate", failing(errno.EOPNOTSUPP, "Operation not supported"))
    ds = load_folder(folder)
    cached, notes = _build(ds, SQUASH, tmp_path / "cache")
    assert cached is not None and "decoded 12 images once" in notes[0]
    plain, fast = build_transform(SQUASH), build_transform(SQUASH, resized=True)
    assert all(torch.equal(fast(cached.read(i)), plain(ds.read(i))) for i in range(len(ds)))
