import fractions
import os

import pytest
import torch

from cxrkit.errors import CxrError
from cxrkit.runs import Run, atomic_write_text, safe_name


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    atomic_write_text(target, "old\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left behind


def test_run_names_are_unique_and_checkpoints_round_trip(tmp_path):
    a, b = Run.create(tmp_path, "r"), Run.create(tmp_path, "r")
    assert a.path != b.path
    a.save_checkpoint("last", {"model": {"w": torch.ones(2)}, "stage": 1})
    state = a.load_checkpoint("last")
    assert state["stage"] == 1 and torch.equal(state["model"]["w"], torch.ones(2))


def test_checkpoints_refuse_pickled_objects(tmp_path):
    run = Run.create(tmp_path, "r")

    torch.save({"x": fractions.Fraction(1, 3)}, run.checkpoint_path("last"))  # an arbitrary pickled class
    with pytest.raises(CxrError, match="cannot be read"):
        run.load_checkpoint("last")


def test_open_rejects_non_runs(tmp_path):
    with pytest.raises(CxrError, match="does not exist"):
        Run.open(tmp_path / "missing")
    with pytest.raises(CxrError, match="not a cxrkit run"):
        Run.open(tmp_path)


def test_atomic_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(("text", "expected"), [
    ("person1_virus_6", "person1_virus_6"),
    ("Pleural Thickening", "Pleural_Thickening"),
    ("../../etc/passwd", "etc_passwd"),
    ("gradcam++", "gradcam"),
    ("a  /\\ b.c", "a_b.c"),
    ("...", "x"),
])
def test_safe_name_keeps_names_inside_the_folder(text, expected):
    assert safe_name(text) == expected
    assert safe_name("", default="image") == "image"
