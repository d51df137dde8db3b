"""Cache writes that fail, simulated by making a system call fail, for the tests of both caches."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

# name -> (the system calls that fail, with their errno and text; the reason the fallback note gives)
FAILED_WRITES: dict[str, tuple[dict[str, tuple[int, str]], str]] = {
    "no space left after the check": ({"posix_fallocate": (errno.ENOSPC, "No space left on device")},
                                      "No space left on device"),
    "a file-size limit": ({"posix_fallocate": (errno.EFBIG, "File too large")}, "File too large"),
    "a sparse file over a file-size limit": ({"posix_fallocate": (errno.EOPNOTSUPP, "Operation not supported"),
                                              "ftruncate": (errno.EFBIG, "File too large")}, "File too large"),
    "a mapping over a file-size limit": ({"memmap": (errno.EFBIG, "File too large")}, "File too large"),
    "a quota on the .json": ({"fsync": (errno.EDQUOT, "Disk quota exceeded")}, "Disk quota exceeded"),
}


def failing(err_no: int, text: str):
    """A stand-in for a system call that fails with ``err_no``."""

    def call(*args, **kwargs):
        raise OSError(err_no, text)

    return call


def _failing_memmap(err_no: int, text: str):
    """``np.memmap`` that fails to make a writable mapping (making one writes to the file), and reads as before."""
    memmap = np.memmap

    def call(*args, **kwargs):
        if kwargs.get("mode", "r+") in ("r+", "w+"):
            raise OSError(err_no, text)
        return memmap(*args, **kwargs)

    return call


def fail_writes(monkeypatch: pytest.MonkeyPatch, failure: str) -> str:
    """Make the calls of ``FAILED_WRITES[failure]`` fail (``memmap`` is numpy's, the others are in ``os``); the
    reason the note should give."""
    calls, reason = FAILED_WRITES[failure]
    for name, (err_no, text) in calls.items():
        if name == "memmap":
            monkeypatch.setattr(np, "memmap", _failing_memmap(err_no, text))
        else:
            monkeypatch.setattr(os, name, failing(err_no, text))
    return reason


def can_allocate(folder: Path) -> bool:
    """Whether the filesystem of ``folder`` allocates space ahead (``posix_fallocate``)."""
    probe = folder / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, 4096)
        return True
    except (AttributeError, OSError):
        return False
    finally:
        os.close(fd)
        probe.unlink()
