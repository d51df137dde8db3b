"""Locks that keep two cxrkit processes from writing the same files at once: two trainings of one run (``cxr train
--resume`` twice), two evaluations into one ``eval/<name>/``.

A lock is a POSIX record lock (``lockf``) on a hidden file that records its holder's process id. It belongs to the
process, not to the open file, so processes the holder forks (DataLoader workers) do not hold it, and the system
releases it the moment the holder ends, however it ends (``kill -9`` included). The message names the process. POSIX
only, like the rest of cxrkit's process handling.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from cxrkit.errors import CxrError


@contextlib.contextmanager
def exclusive(path: str | Path, busy: Callable[[str], str], note: Callable[[str], None] | None = None
              ) -> Iterator[None]:
    """Hold the lock file ``path`` for the block.

    Args:
        path: The lock file, made if missing (its folder must exist).
        busy: The message for a lock held by another process, given who holds it (``"process 1234"``).
        note: Where a lock held by another process is waited for, told ``busy(who)`` once before waiting; without
            it such a lock is refused with ``CxrError(busy(who))``.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise CxrError(f"{path}: cannot write here ({err.strerror or err})") from err
    try:
        if not _try_lock(fd):
            holder = _holder(fd)
            who = "another process" if holder is None else f"process {holder}"
            if note is None:
                raise CxrError(busy(who))
            note(busy(who))
            fcntl.lockf(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock (a record lock goes with the process's first close of the file)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):  # held by another process
            return False
        raise
    return True


def _holder(fd: int) -> int | None:
    """The process id the lock's holder wrote, or None (not written yet, or not a number)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
