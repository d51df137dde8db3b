import errno
import fractions
import io
import os
import re
import subprocess
import sys

import pytest
import torch

from cxrkit.errors import CxrError, first_line
from cxrkit.runs import (
    Run,
    atomic_write,
    atomic_write_text,
    check_writable,
    csv_text,
    replaced_files,
    safe_name,
    scratch_folder,
    staged,
    unique_safe_names,
)


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    atomic_write_text(target, "old\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(CxrError, match=r"metrics\.csv: cannot write \(disk full\)"):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left behind


def test_a_checkpoint_that_does_not_fit_is_a_one_line_error_and_keeps_the_old_one(tmp_path):
    """torch.save meets the full disk (here a file-size limit, as a quota gives) in its zip writer and raises a
    RuntimeError ("unexpected pos") over the OSError: the error must still say why, and best.pt stay as it was."""
    script = f"""
import resource, torch
from cxrkit.errors import CxrError
from cxrkit.runs import Run
run = Run({str(tmp_path / "run")!r})
run.save_checkpoint("best", {{"model": {{"w": torch.ones(8)}}}})
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    run.save_checkpoint("best", {{"model": {{"w": torch.zeros(1 << 20)}}}})
except CxrError as err:
    print(err)
print(run.load_checkpoint("best")["model"]["w"].tolist())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    message, kept = result.stdout.strip().splitlines()
    assert message == f"{tmp_path / 'run' / 'checkpoints' / 'best.pt'}: cannot write (File too large)"
    assert kept == str([1.0] * 8)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.pt"]


def test_replaced_files_swap_a_folders_files_only_once_the_new_ones_are_written(tmp_path):
    folder = tmp_path / "eval"
    (folder / "explain").mkdir(parents=True)
    for name, text in (("metrics.json", "old"), ("roc.png", "old"), ("report.html", "old")):
        (folder / name).write_text(text)
    dead = folder / ".new.999999999.abc.tmp"  # left by a killed writer (no such process)
    dead.mkdir()
    (dead / "roc.png").write_text("half")
    with pytest.raises(CxrError, match=rf"^{re.escape(str(folder / 'pr.png'))}: cannot write here \(is a directory\)$"):
        with replaced_files(folder, "metrics.json") as new:
            atomic_write_text(new / "roc.png", "new")
            (new / "pr.png").mkdir()
            atomic_write_text(new / "pr.png", "new")
    assert {p.name: p.read_text() for p in folder.iterdir() if p.is_file()} == {
        "metrics.json": "old", "roc.png": "old", "report.html": "old"}
    assert sorted(p.name for p in folder.iterdir()) == ["explain", "metrics.json", "report.html", "roc.png"]
    with replaced_files(folder, "metrics.json") as new:
        for name in ("roc.png", "metrics.json"):
            atomic_write_text(new / name, "new")
    assert {p.name: p.read_text() for p in folder.iterdir() if p.is_file()} == {"metrics.json": "new", "roc.png": "new"}
    assert sorted(p.name for p in folder.iterdir()) == ["explain", "metrics.json", "roc.png"]


def test_a_writer_that_fails_halfway_leaves_the_old_file(tmp_path):
    target = tmp_path / "best.pt"
    target.write_bytes(b"old")

    def half(fh):
        fh.write(b"new, but not all of it")
        raise RuntimeError("out of space")

    with pytest.raises(RuntimeError):
        atomic_write(target, half)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_saving_a_checkpoint_streams_to_disk_without_a_copy_in_memory(tmp_path):
    import tracemalloc

    run = Run.create(tmp_path, "r")
    weights = torch.arange(10_000_000, dtype=torch.float32)  # 40 MB
    tracemalloc.start()
    try:
        run.save_checkpoint("last", {"model": {"w": weights}})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, f"{peak} bytes of Python memory to save 40 MB of weights"
    assert torch.equal(run.load_checkpoint("last")["model"]["w"], weights)


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_linked_checkpoint_keeps_its_weights_when_the_source_is_saved_again(tmp_path, monkeypatch, hard_links):
    """Training links stage_best to best.pt when both improve in one epoch; best.pt's next save must not change it,
    with a hard link or with the copy made where the file system has no links."""
    if not hard_links:
        def no_links(src, dst):
            raise OSError("hard links are not supported")

        monkeypatch.setattr(os, "link", no_links)
    run = Run.create(tmp_path, "r")
    run.save_checkpoint("best", {"model": {"w": torch.ones(3)}, "epoch": 1})
    run.save_checkpoint("stage_best", {"model": {"w": torch.zeros(3)}})  # an older one, replaced by the link
    run.link_checkpoint("best", "stage_best")
    assert os.path.samefile(run.checkpoint_path("best"), run.checkpoint_path("stage_best")) == hard_links
    run.save_checkpoint("best", {"model": {"w": torch.full((3,), 2.0)}, "epoch": 2})
    assert torch.equal(run.load_checkpoint("stage_best")["model"]["w"], torch.ones(3))
    assert torch.equal(run.load_checkpoint("best")["model"]["w"], torch.full((3,), 2.0))
    run.checkpoint_path("stage_best").unlink()  # what the end of a stage does
    assert run.load_checkpoint("best")["epoch"] == 2
    assert sorted(p.name for p in run.checkpoint_path("best").parent.iterdir()) == ["best.pt"]


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


def test_a_damaged_or_torchscript_checkpoint_is_named_without_torch_s_advice(tmp_path):
    """torch's message for such files advises loading with weights_only=False, which would run pickled code."""
    run = Run.create(tmp_path, "r")
    run.checkpoint_path("best").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CxrError) as err:
        run.load_checkpoint("best")
    assert str(err.value).endswith("best.pt cannot be read: it is not a checkpoint of tensors (damaged, or it holds "
                                   "Python objects, which are not loaded)")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), run.checkpoint_path("last"))
    with pytest.raises(CxrError, match=r"last\.pt cannot be read: it is a TorchScript model, not a checkpoint$"):
        run.load_checkpoint("last")


def test_a_run_owns_its_state_but_not_its_outputs(tmp_path):
    run = Run.create(tmp_path, "r")
    for owned in ("checkpoints/best.pt", "checkpoints/anything", "labels.json", "recipe.yaml", "splits.csv",
                  "export/best.onnx", "export/last.int8.onnx"):
        assert run.owns(run.path / owned), owned
    assert "--engine onnx-int8" in run.owns(run.path / "export" / "best.int8.onnx")
    assert run.owns(tmp_path / ".." / tmp_path.name / run.path.name / "labels.json")  # however it is spelled
    for free in ("export/best.torchscript.pt", "export/mine.onnx", "eval/x/labels.json", "predictions.csv"):
        assert run.owns(run.path / free) is None, free
    assert run.owns(tmp_path / "labels.json") is None


def test_check_writable_says_what_writing_would_say_and_makes_nothing(tmp_path):
    (tmp_path / "file.txt").write_text("keep")
    with pytest.raises(CxrError, match=r"cannot write here \(.*file\.txt is a file, not a folder\)"):
        check_writable(tmp_path / "file.txt" / "out.csv")
    with pytest.raises(CxrError, match=r"cannot write here \(is a directory\)"):
        check_writable(tmp_path)
    with pytest.raises(CxrError, match=r"/proc/x\.csv: cannot write here"):
        check_writable("/proc/x.csv")
    check_writable(tmp_path / "new" / "deeper" / "out.csv")
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_a_staged_file_replaces_the_earlier_one_only_when_complete(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("earlier")
    with pytest.raises(RuntimeError), staged(path) as partial:
        partial.write_text("half")
        raise RuntimeError("the check failed")
    assert path.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    with staged(path) as partial:
        assert partial.parent == tmp_path and partial.suffix == ".onnx" and partial != path
        partial.write_text("new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_staging_removes_what_killed_writes_of_the_file_left_and_keeps_a_live_one(tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / "best.onnx"
    killed = tmp_path / f".best.onnx.{gone.stdout.strip()}.partial.onnx"
    writing = tmp_path / f".best.onnx.{os.getppid()}.partial.onnx"  # a live process (this one's parent)
    other = tmp_path / f".int8.onnx.{gone.stdout.strip()}.partial.onnx"  # another file's: its own write cleans it
    for leftover in (killed, writing, other):
        leftover.write_bytes(b"x")
    with staged(path) as partial:
        partial.write_text("new")
    assert path.read_text() == "new" and not killed.exists() and writing.exists() and other.exists()


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


def test_unwritable_destinations_are_one_line_errors(tmp_path):
    (tmp_path / "file.txt").write_text("keep")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CxrError, match=r"file\.txt/out\.csv: cannot write here \(.*\.txt is a file, not a folder\)"):
        atomic_write_text(tmp_path / "file.txt" / "out.csv", "x")
    with pytest.raises(CxrError, match=r"folder: cannot write here \(is a directory\)"):
        atomic_write_text(tmp_path / "folder", "x")
    with pytest.raises(CxrError, match=r"file\.txt: cannot create runs here"):
        Run.create(tmp_path / "file.txt", "run")
    assert (tmp_path / "file.txt").read_text() == "keep" and list((tmp_path / "folder").iterdir()) == []


def test_an_empty_checkpoint_is_named_in_the_error(tmp_path):
    run = Run.create(tmp_path, "run")
    run.checkpoint_path("best").write_bytes(b"")
    with pytest.raises(CxrError, match=r"checkpoint .*best\.pt cannot be read: \w+"):
        run.load_checkpoint("best")


def test_first_line_of_an_exception():
    assert first_line(ValueError("\n  first\nsecond")) == "first"
    assert first_line(IndexError()) == "IndexError"
    assert first_line(OSError(f"cannot read {io.BytesIO()!r}")) == "cannot read the file"
    # a line that announces the next ones keeps them (it used to end the message at "plugins:")
    plugins = f"Unable to decode as exceptions were raised by all available plugins:\n  pillow: cannot identify " \
              f"image file {io.BytesIO()!r}\n  pylibjpeg: no decoder\n  gdcm: absent\n  rle: absent\n"
    assert first_line(RuntimeError(plugins)) == ("Unable to decode as exceptions were raised by all available "
                                                 "plugins: pillow: cannot identify image file the file; pylibjpeg: "
                                                 "no decoder; gdcm: absent")


def test_names_cannot_place_runs_or_evaluations_outside_their_folders(tmp_path):
    out = tmp_path / "a" / "b"
    for name in ("../../escape", "/tmp/absolute", "..", ""):
        run = Run.create(out, name)
        assert run.path.parent == out, name
        assert run.eval_dir("../../zzz").parent == run.path / "eval"
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 4 and names[0].startswith("escape-") and names[-1].startswith("tmp_absolute-")
    assert all(name.startswith("run-") for name in names[1:3])


def test_opening_a_file_as_a_run_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CxrError, match=r"run .*notes\.txt is a file, not a folder"):
        Run.open(tmp_path / "notes.txt")
    with pytest.raises(CxrError, match=r"run .*nowhere does not exist"):
        Run.open(tmp_path / "nowhere")


def test_resuming_removes_the_temporary_files_of_killed_writes_and_not_those_of_live_ones(tmp_path):
    """A write killed half-way (kill -9) left a hidden temporary file as large as a checkpoint, for good. And a
    second resume removed the live temporary file of a run being trained (or evaluated) by another process, which
    then failed; only files whose writer has ended are leftovers."""
    run = Run.create(tmp_path, "r")
    dead, live = _dead_pid(), os.getpid()
    leftovers = [run.path / f".metrics.csv.{dead}.k2j3_x.tmp", run.path / "checkpoints" / f".last.pt.{dead}.a8b.tmp",
                 run.path / "checkpoints" / f".stage_best.pt.{dead}.link",
                 run.path / "export" / f".best.int8.onnx.{dead}.partial.onnx",
                 run.path / "eval" / "chest_xray-test" / ".metrics.json.zz91.tmp",  # an earlier cxrkit's: no pid
                 run.path / "checkpoints" / ".best.pt.12345678.tmp"]
    kept = [run.path / "checkpoints" / "last.pt", run.path / ".notes", run.path / "export" / "best.onnx",
            run.path / "my.tmp", run.path / ".train.lock", run.path / "checkpoints" / f".last.pt.{live}.x1_y.tmp",
            run.path / "eval" / "chest_xray-test" / f".pr.png.{live}.k9.tmp",
            run.path / "export" / f".best.onnx.{live}.partial.onnx", run.path / "checkpoints" / f".best.pt.{live}.link"]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert run.remove_leftovers() == 6
    assert [p for p in leftovers if p.exists()] == [] and all(p.exists() for p in kept)
    assert run.remove_leftovers() == 0


def test_the_scratch_folder_of_a_killed_export_is_a_leftover_and_a_live_one_is_not(tmp_path):
    """An export killed half-way leaves its folder of intermediate files (as large as the model) beside the file."""
    run = Run.create(tmp_path, "r")
    dead = run.path / "export" / f".best.onnx.{_dead_pid()}.k2j3_x.tmp"
    live = run.path / "export" / f".best.int8.onnx.{os.getpid()}.a8b.tmp"
    mine = run.path / "export" / "my.tmp"  # a user's folder, not hidden: never touched
    for folder in (dead, live, mine):
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"x")
    assert run.remove_leftovers() == 1
    assert not dead.exists() and (live / "model.onnx").is_file() and (mine / "model.onnx").is_file()


def test_a_scratch_folder_is_beside_its_file_and_goes_after_an_error_or_ctrl_c(tmp_path):
    target = tmp_path / "out" / "best.onnx"
    for failure in (KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises((KeyboardInterrupt, CxrError)) as raised:
            with scratch_folder(target) as folder:
                assert folder.parent == target.parent
                assert folder.name.startswith(f".best.onnx.{os.getpid()}.") and folder.name.endswith(".tmp")
                (folder / "model.onnx").write_bytes(b"x")
                raise failure
        assert list(target.parent.iterdir()) == []
    assert str(raised.value) == f"{target}: cannot write (No space left on device)"


def test_making_a_scratch_folder_removes_those_killed_writers_left_beside_it(tmp_path):
    """A killed int8 export leaves ``..best.int8.onnx.<pid>.partial.onnx.<pid>.<random>.tmp`` (a scratch folder
    beside the staged file); the next export into that folder removes it, not only ``train --resume``."""
    target = tmp_path / "export" / "best.int8.onnx"
    dead_pid = _dead_pid()
    dead = target.parent / f"..best.int8.onnx.{dead_pid}.partial.onnx.{dead_pid}.q1w_2e.tmp"
    live = target.parent / f".best.onnx.{os.getpid()}.a8b.tmp"
    mine = target.parent / "notes.tmp"
    for folder in (dead, live, mine):
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"x" * 1000)
    with scratch_folder(target) as folder:
        assert not dead.exists() and folder.is_dir()
        assert (live / "model.onnx").is_file() and (mine / "model.onnx").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([live.name, mine.name])


def test_an_atomic_writes_temporary_file_names_its_process(tmp_path):
    seen = []
    atomic_write(tmp_path / "a.json", lambda fh: seen.extend(p.name for p in tmp_path.iterdir()))
    assert len(seen) == 1 and seen[0].startswith(f".a.json.{os.getpid()}.") and seen[0].endswith(".tmp")


def test_a_temporary_file_removed_by_another_process_is_named_in_the_error(tmp_path):
    def removed_meanwhile(fh):
        for p in tmp_path.glob(".*.tmp"):
            p.unlink()

    with pytest.raises(CxrError, match=r"a\.json: cannot write \(its temporary file \.a\.json\.\d+\.\w+\.tmp was "
                                       r"removed while it was written, by another process\)"):
        atomic_write(tmp_path / "a.json", removed_meanwhile)


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_ctrl_c_during_an_atomic_write_takes_effect_once_the_file_is_in_place(tmp_path):
    """torch.save turned a KeyboardInterrupt inside its writer into a RuntimeError ("unexpected pos"), which
    cxr compare recorded as a failed cell before going on; now the write finishes, then the interrupt comes."""
    path = tmp_path / "best.pt"
    result = _python(f"""
import os, signal, torch
from cxrkit.runs import atomic_write

signal.signal(signal.SIGINT, signal.default_int_handler)  # a process started in the background ignores Ctrl-C

def write(fh):
    fh.write(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the write
    torch.save({{"w": torch.arange(10)}}, fh)

try:
    atomic_write({str(path)!r}, write)
except KeyboardInterrupt:
    print("KeyboardInterrupt")
""")
    assert result.stdout.strip() == "KeyboardInterrupt", result.stderr
    data = path.read_bytes()
    assert len(data) > 1000 and data[:1000] == b"x" * 1000  # the whole file, in place
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temporary file left


def test_a_ctrl_c_that_python_ignores_still_ends_the_command_as_interrupted(tmp_path):
    """A KeyboardInterrupt raised inside __del__ (a DataLoader iterator stopping its workers) is printed and ignored
    by Python, and the command went on to exit 0; the CLI remembers the Ctrl-C and exits 130."""
    result = _python("""
import os, signal, sys, time
import cxrkit.cli.main as cli

signal.signal(signal.SIGINT, signal.default_int_handler)  # a process started in the background ignores Ctrl-C

class Workers:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the handler runs here, inside __del__

def command():
    Workers()  # dropped at once
    raise SystemExit(0)

cli.app = command
cli.main()
""")
    assert result.returncode == 130, (result.returncode, result.stderr)
    assert result.stderr.strip() == "interrupted"  # not Python's "Exception ignored in ..." traceback


def test_a_command_started_where_ctrl_c_is_ignored_keeps_ignoring_it():
    """A shell script's `cxr train ... &` runs with SIGINT ignored, so that Ctrl-C in the terminal leaves it be."""
    result = _python("""
import os, signal, time
import cxrkit.cli.main as cli

signal.signal(signal.SIGINT, signal.SIG_IGN)

def command():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    raise SystemExit(0)

cli.app = command
cli.main()
""")
    assert result.returncode == 0 and result.stderr == "", (result.returncode, result.stderr)


def test_csv_text_gives_one_row_per_dict_whatever_the_names_hold():
    """A carriage return, which the writer does not quote with "\\n" line ends, split a row in two; a file name that
    is not UTF-8 could not be written."""
    import csv

    rows = [{"source": "cr\rx.png", "p": 0.5}, {"source": os.fsdecode(b"bad\xff.png"), "p": 0.25},
            {"source": 'a "quoted", name\nwith a newline', "p": 1}]
    text = csv_text(rows)
    text.encode("utf-8")
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert [r["source"] for r in parsed] == ["cr\\rx.png", "bad\\xff.png", 'a "quoted", name\\nwith a newline']
    assert [float(r["p"]) for r in parsed] == [0.5, 0.25, 1.0]


def test_unique_safe_names_number_the_names_that_come_out_the_same():
    assert unique_safe_names(["病毒", "肺炎", "a,b", "a;b", "x-2", "ok"]) == ["x", "x-2", "a_b", "a_b-2", "x-2-2", "ok"]
