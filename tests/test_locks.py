"""Two processes on one run: a second resume is refused, a second evaluation under one name waits its turn."""

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from cxrkit.errors import CxrError
from cxrkit.locks import exclusive

HOLD = """
import os, sys, time, pathlib
from cxrkit.locks import exclusive
path = pathlib.Path(sys.argv[1])
with exclusive(path, str):
    if len(sys.argv) > 2 and os.fork() == 0:  # a child that keeps the lock's file open, as DataLoader workers do
        time.sleep(float(sys.argv[2]))
        os._exit(0)
    print("ready", flush=True)
    while not path.with_name("release").exists():
        time.sleep(0.05)
"""


def _holder(path, *child_sleep: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), *child_sleep], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _busy(who):
    return f"busy with {who}"


def test_a_lock_held_by_a_running_process_is_refused_naming_it_or_waited_for(tmp_path):
    lock = tmp_path / ".x.lock"
    holder = _holder(lock)
    try:
        with pytest.raises(CxrError, match=f"^busy with process {holder.pid}$"), exclusive(lock, _busy):
            pass
        notes = []
        with exclusive(lock, _busy, lambda note: (notes.append(note), (tmp_path / "release").touch())):
            assert holder.wait(timeout=30) == 0  # it had to let go first
            assert lock.read_text() == f"{os.getpid()}\n"
        assert notes == [f"busy with process {holder.pid}"]
    finally:
        (tmp_path / "release").touch()
        holder.wait(timeout=30)
    with exclusive(lock, _busy):  # released when the block ended
        pass


def test_a_killed_holder_releases_the_lock_and_processes_it_forked_do_not_hold_it(tmp_path):
    """A training's DataLoader workers are forked while it holds the lock; killed with -9, the training must not
    leave them holding it, or an immediate --resume would be refused while they wind down."""
    lock = tmp_path / ".x.lock"
    holder = _holder(lock)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with exclusive(lock, _busy):
        pass
    holder = _holder(lock, "30")  # its child lives on for 30 s after it has gone
    child = int(open(f"/proc/{holder.pid}/task/{holder.pid}/children").read().split()[0])
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    try:
        assert os.path.exists(f"/proc/{child}")
        with exclusive(lock, _busy):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def _copy(run, tmp_path):
    from cxrkit.runs import Run

    return Run.open(shutil.copytree(run, tmp_path / run.name))


def test_a_second_resume_of_a_run_being_trained_is_refused_and_leaves_its_files_alone(tiny_run, tmp_path):
    """It removed the first training's temporary checkpoint as a leftover of an interrupted run, and that training
    failed; or both trained the run at once, each rewriting its checkpoints."""
    from cxrkit.train.api import train_recipe

    run = _copy(tiny_run, tmp_path)
    holder = _holder(run.path / ".train.lock")
    writing = run.path / "checkpoints" / f".last.pt.{holder.pid}.q8z.tmp"
    writing.write_bytes(b"half a checkpoint")
    last = (run.path / "checkpoints" / "last.pt").read_bytes()
    try:
        with pytest.raises(CxrError, match=rf"^run {run.path} is being trained by process {holder.pid}; wait for it"):
            train_recipe(resume=run)
        assert writing.exists() and (run.path / "checkpoints" / "last.pt").read_bytes() == last
    finally:
        (tmp_path / run.name / "release").touch()
        holder.wait(timeout=30)
    train_recipe(resume=run)  # once it has ended, resuming works (the run is complete: nothing to do)


def test_a_second_evaluation_under_one_name_waits_and_leaves_the_first_ones_files_alone(tiny_run, tmp_path):
    """The second evaluation removed every file of eval/<name> as an earlier evaluation's, including the first
    one's figures being written, and the first failed: "pr.png: cannot write (No such file or directory)"."""
    from rich.console import Console

    from cxrkit.eval.evaluate import evaluate_run
    from cxrkit.serve.predictor import Predictor

    run = _copy(tiny_run, tmp_path)
    out = run.eval_dir("chest_xray-test")
    holder = _holder(out.parent / ".chest_xray-test.lock")
    writing = out / f".pr.png.{holder.pid}.m2x.tmp"
    writing.write_bytes(b"half a figure")
    console, kept = Console(file=io.StringIO(), width=400), []

    def release_once_waited_for():
        deadline = time.monotonic() + 120
        while "waiting for" not in console.file.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        kept.append(writing.exists())
        (out.parent / "release").touch()

    watcher = threading.Thread(target=release_once_waited_for)
    watcher.start()
    try:
        _, folder = evaluate_run(Predictor(run.path, engine="torch"), name="chest_xray-test", console=console)
    finally:
        (out.parent / "release").touch()
        holder.wait(timeout=30)
        watcher.join(timeout=30)
    assert f"waiting for process {holder.pid}, which is writing {out}" in console.file.getvalue()
    assert kept == [True]  # the first one's file was still there when it let go
    assert folder == out and (out / "metrics.json").is_file() and (out / "predictions.csv").is_file()
