"""`cxr cache`: the entries runs leave in the cache folder, their last use, and clearing them safely."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from synth import kermany_folder
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from cxrkit.cache import parse_age, parse_size, readable_size, scan, select
from cxrkit.cli.main import app
from cxrkit.data.decoded import decoded_images
from cxrkit.data.folder import load_folder
from cxrkit.data.transforms import Preprocessing
from cxrkit.errors import CxrError
from cxrkit.train.features import extract_features
from cxrkit.train.runtime import setup_runtime

PRE = Preprocessing(size=24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")
NET = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
DAY = 86400


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def targets(self):
        return torch.arange(6) % 2

    def __getitem__(self, i):
        return {"image": torch.full((3, 8, 8), float(i)), "target": self.targets()[i]}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder with one decoded-image entry and one feature entry, as runs leave them."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CXR_CACHE_DIR", str(root))
    folder = kermany_folder(tmp_path / "xray", per_class=4, size=40)
    assert decoded_images(load_folder(folder), PRE, log=lambda _: None) is not None
    runtime = setup_runtime("cpu", "fp32", channels_last=False, workers=0)
    extract_features(NET, DataLoader(Images(), batch_size=4), runtime, store=root / "features" / "f00d.bin",
                     about={"backbone": "tiny", "split": "train"})
    return root, folder


def _age(path, days):
    then = time.time() - days * DAY
    os.utime(path, (then, then))


def _cli(*args):
    return CliRunner().invoke(app, ["cache", *args], env={"COLUMNS": "200"})


def test_scan_finds_what_runs_wrote_and_says_what_it_is(cache):
    root, folder = cache
    entries = {e.kind: e for e in scan(root)}
    assert set(entries) == {"decoded", "features"}
    decoded, feats = entries["decoded"], entries["features"]
    assert decoded.status == feats.status == "complete"
    assert decoded.meta["images"] == 8 and decoded.size == 8 * 24 * 24 + (root / "decoded" /
                                                                            f"{decoded.key}.json").stat().st_size
    assert decoded.describe() == f"24x24 px from {folder / 'train'}"  # the images' folder, not the first class's
    assert feats.key == "f00d" and feats.describe() == "float32 144, pooled, tiny, train"
    assert {f.name for f in feats.files} == {"f00d.bin", "f00d.json"}


def test_reuse_marks_an_entry_as_used_now(cache):
    root, folder = cache
    decoded = next(e for e in scan(root) if e.kind == "decoded")
    _age(root / "decoded" / f"{decoded.key}.json", 40)
    _age(root / "features" / "f00d.json", 40)
    assert all(time.time() - e.last_used > 39 * DAY for e in scan(root))
    assert decoded_images(load_folder(folder), PRE, log=lambda _: None) is not None
    runtime = setup_runtime("cpu", "fp32", channels_last=False, workers=0)
    extract_features(NET, DataLoader(Images(), batch_size=4), runtime, store=root / "features" / "f00d.bin")
    assert all(time.time() - e.last_used < 60 for e in scan(root))


def test_a_run_reading_a_removed_entry_keeps_its_data(cache, monkeypatch):
    root, _ = cache
    from cxrkit.train import features

    monkeypatch.setattr(features, "MEMORY_SHARE", 0.0)  # memory-mapped, as a large entry is
    runtime = setup_runtime("cpu", "fp32", channels_last=False, workers=0)
    opened = extract_features(NET, DataLoader(Images(), batch_size=4), runtime, store=root / "features" / "f00d.bin")
    assert opened.mapped
    assert _cli("clear").exit_code == 0 and not (root / "features" / "f00d.bin").exists()
    assert torch.equal(opened.features, NET(torch.stack([Images()[i]["image"] for i in range(6)])).detach())


def test_leftovers_of_interrupted_writes_go_and_a_live_write_is_never_touched(cache):
    root, _ = cache
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (root / "features" / f"beef.bin.{dead.stdout.strip()}.tmp").write_bytes(b"x" * 100)  # killed mid-pass
    (root / "features" / "cafe.bin").write_bytes(b"x" * 10)  # renamed into place, .json never written
    _age(root / "features" / "cafe.bin", 1)
    (root / "decoded" / f"abcd.u8.{os.getpid()}.tmp").write_bytes(b"x" * 10)  # this process is still writing it
    (root / "features" / "d00d.bin").write_bytes(b"x" * 10)  # its .json's atomic write was killed a moment ago
    (root / "features" / f".d00d.json.{dead.stdout.strip()}.a1b2.tmp").write_bytes(b"{")
    _age(root / "features" / "d00d.bin", 1)
    entries = {e.key: e for e in scan(root)}
    assert entries["beef"].status == entries["cafe"].status == entries["d00d"].status == \
        "incomplete (an interrupted write)"
    assert entries["abcd"].status == f"being written (process {os.getpid()})"
    # even a filter that keeps every complete entry removes the leftovers, and never the live write
    chosen = {e.key for e in select(scan(root), older_than=30 * DAY)}
    assert chosen == {"beef", "cafe", "d00d"}
    assert "abcd" not in {e.key for e in select(scan(root))}

    result = _cli("clear")
    assert result.exit_code == 0, result.output
    assert [e.key for e in scan(root)] == ["abcd"]
    assert f"kept decoded/abcd: being written (process {os.getpid()})" in result.stdout


def test_clear_on_a_read_only_cache_reports_only_what_it_removed(cache, monkeypatch):
    """It printed "removed 2 entries" above "could not remove 4 file(s)", and 2 were still there."""
    root, _ = cache
    unlink = Path.unlink

    def read_only_features(path, missing_ok=False):
        if root / "features" in path.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only_features)
    entries = {e.kind: e for e in scan(root)}
    result = _cli("clear")
    assert isinstance(result.exception, CxrError), result.output
    features = entries["features"]
    assert result.stdout.startswith(f"removed 1 entry, {readable_size(entries['decoded'].size)}; 1 left, "
                                    f"{readable_size(features.size)}"), result.stdout
    assert str(result.exception).startswith(f"could not remove {len(features.files)} file(s): {root / 'features'}")
    assert str(result.exception).endswith(": Read-only file system")
    assert [e.kind for e in scan(root)] == ["features"]
    again = _cli("clear")  # nothing can go
    assert again.stdout.startswith(f"removed 0 entries, 0 B; 1 left, {readable_size(features.size)}"), again.stdout
    assert isinstance(again.exception, CxrError)


def test_rebuilding_an_entry_removes_what_a_killed_build_of_it_left(cache):
    root, folder = cache
    decoded = next(e for e in scan(root) if e.kind == "decoded")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = root / "decoded" / f"{decoded.key}.u8.{gone.stdout.strip()}.tmp"
    leftover.write_bytes(b"x" * 100)
    for path in decoded.files:
        path.unlink()
    assert decoded_images(load_folder(folder), PRE, log=lambda _: None) is not None
    assert not leftover.exists() and [e.status for e in scan(root)] == ["complete", "complete"]


def test_older_than_and_max_size_remove_the_least_recently_used(cache):
    root, _ = cache
    decoded = next(e for e in scan(root) if e.kind == "decoded")
    _age(root / "decoded" / f"{decoded.key}.json", 40)  # the decoded images were last used 40 days ago
    assert [e.kind for e in select(scan(root), older_than=30 * DAY)] == ["decoded"]
    assert select(scan(root), older_than=50 * DAY) == []
    feats = next(e for e in scan(root) if e.kind == "features")
    # a limit that only the features fit under removes the older decoded images first, and then nothing more
    assert [e.kind for e in select(scan(root), max_size=feats.size)] == ["decoded"]
    assert {e.kind for e in select(scan(root), max_size=0)} == {"decoded", "features"}
    assert select(scan(root), max_size=10**9) == []
    assert [e.kind for e in select(scan(root), kinds=["features"], max_size=0)] == ["features"]


def test_a_narrow_terminal_gets_two_lines_per_entry(cache):
    narrow = CliRunner().invoke(app, ["cache"], env={"COLUMNS": "60"})
    assert narrow.exit_code == 0, narrow.output
    lines = narrow.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("features f00d"))
    assert "6 images" in lines[first] and lines[first + 1] == "  float32 144, pooled, tiny, train"


def test_an_entry_renamed_into_place_a_moment_ago_is_being_written(cache):
    root, _ = cache
    (root / "features" / "fade.bin").write_bytes(b"x")  # its .json comes next
    entry = next(e for e in scan(root) if e.key == "fade")
    assert entry.status == "being written (a write in progress)" and entry not in select(scan(root))
    _age(root / "features" / "fade.bin", 1)  # a day later: what a killed write left
    assert next(e for e in scan(root) if e.key == "fade").status == "incomplete (an interrupted write)"


def test_cli_lists_clears_by_kind_and_dry_run_removes_nothing(cache):
    root, folder = cache
    listed = _cli()
    assert listed.exit_code == 0, listed.output
    assert "decoded: 1 entry" in listed.stdout and "features: 1 entry" in listed.stdout
    assert "float32 144, pooled, tiny, train" in listed.stdout
    as_json = json.loads(_cli("list", "--json").stdout)
    assert {e["kind"] for e in as_json["entries"]} == {"decoded", "features"}
    assert as_json["bytes"] == sum(e["bytes"] for e in as_json["entries"]) > 0

    dry = _cli("clear", "--dry-run")
    assert dry.exit_code == 0 and "would remove 2 entries" in dry.stdout
    assert len(scan(root)) == 2
    cleared = _cli("clear", "--kind", "decoded")
    assert cleared.exit_code == 0 and "removed 1 entry" in cleared.stdout and "1 left" in cleared.stdout
    assert [e.kind for e in scan(root)] == ["features"]
    # a run rebuilds what was cleared
    notes = []
    assert decoded_images(load_folder(folder), PRE, log=notes.append) is not None
    assert "decoded 8 images once" in notes[0]


def test_local_weights_are_listed_and_never_cleared(cache, tmp_path, monkeypatch):
    root, _ = cache
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    weights = tmp_path / "home" / ".cache" / "cxrkit" / "weights"
    weights.mkdir(parents=True)
    (weights / "resnet18.a1_in1k.safetensors").write_bytes(b"w" * 2048)
    assert f"weights: 1 file(s), 2.0 KiB in {weights}" in _cli().stdout
    assert _cli("clear").exit_code == 0
    assert (weights / "resnet18.a1_in1k.safetensors").is_file() and scan(root) == []


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500M", 500 * 10**6), ("2GiB", 2 * 2**30),
                                           ("1.5 kib", 1536), ("0", 0)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,expected", [("30d", 30 * DAY), ("12h", 12 * 3600), ("2w", 14 * DAY), ("90min", 5400)])
def test_ages(text, expected):
    assert parse_age(text) == expected


@pytest.mark.parametrize("args,message", [
    (["clear", "--max-size", "5XB"], "--max-size '5XB': give a size such as 500MB"),
    (["clear", "--older-than", "5"], "--older-than '5': give an age such as 30d"),
    (["clear", "--older-than", "1M"], "--older-than '1M': give an age"),  # minutes or months: refused
    (["clear", "--kind", "weights"], "--kind 'weights': choose one of decoded, features"),
])
def test_bad_options_are_one_line_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path))
    result = _cli(*args)
    assert result.exit_code != 0 and isinstance(result.exception, CxrError)
    assert message in str(result.exception)


def test_an_existing_folder_on_a_read_only_disk_is_unwritable(tmp_path, monkeypatch):
    """mkdir passes on an existing folder of a read-only disk; only creating a file tells."""
    from cxrkit import runs
    from cxrkit.cache import unwritable

    assert unwritable(tmp_path / "new") is None and (tmp_path / "new").is_dir()

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(runs.tempfile, "TemporaryFile", read_only)
    assert unwritable(tmp_path / "new") == "Read-only file system"
    (tmp_path / "file").write_text("x")
    assert unwritable(tmp_path / "file" / "features") is not None  # a file where the folder should be
