"""Locks that keep two cxrkit processes from writing the same files at once: two trainings of one run (``cxr train
--resume`` twice), two evaluations into one ``eval/<name>/``.

A lock is ``flock`` on a hidden file that records its holder's process id, so the system releases it when the
holder ends, however it ends (``kill -9`` included), and the message names the process. POSIX only, like the rest
of cxrkit's process handling.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cxrkit.errors import CxrError

ORPHAN_WAIT = 30.0  # seconds to wait for a lock whose holder has exited: its forked DataLoader workers still hold it


@contextlib.contextmanager
def exclusive(path: str | Path, busy: Callable[[int | None], str], note: Callable[[str], None] | None = None
              ) -> Iterator[None]:
    """Hold the lock file ``path`` for the block.

    Args:
        path: The lock file, made if missing (its folder must exist).
        busy: The message for a lock held by a running process, given its id (None when unknown).
        note: Where a lock held by a running process is waited for, told ``busy(pid)`` once before waiting; without
            it such a lock is refused with ``CxrError(busy(pid))``.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise CxrError(f"{path}: cannot write here ({err.strerror or err})") from err
    try:
        if not _try_lock(fd):
            holder = _holder(fd)
            if holder is not None and not _alive(holder):
                _wait_for_orphans(fd, path)
            elif note is None:
                raise CxrError(busy(holder))
            else:
                note(busy(holder))
                fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int) -> int | None:
    """The process id the lock's holder wrote, or None (not written yet, or not a number)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    from cxrkit.runs import process_alive

    return process_alive(pid)


def _wait_for_orphans(fd: int, path: Path) -> None:
    """The holder has exited but processes it forked (DataLoader workers, which stop within seconds of their parent)
    still hold the lock: wait for them."""
    deadline = time.monotonic() + ORPHAN_WAIT
    while not _try_lock(fd):
        if time.monotonic() > deadline:
            raise CxrError(f"{path}: still locked {ORPHAN_WAIT:g} s after its process exited (its child processes "
                           "still run); stop them, or remove the file")
        time.sleep(0.2)
