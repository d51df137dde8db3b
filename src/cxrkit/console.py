"""Where cxrkit's notes, warnings and progress bars go."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.console import Console


@contextlib.contextmanager
def quiet_logger(name: str | None = None, below: int = logging.ERROR) -> Iterator[None]:
    """Hold back a library's log lines below ``below`` (by default ERROR: errors still show) on the logger ``name``
    (None: the root logger) while the block runs; the level is put back afterwards."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, below))
    try:
        yield
    finally:
        logger.setLevel(level)


class _MutedForThread(io.TextIOBase):
    """A stream that drops what one thread writes and passes on what the others write."""

    def __init__(self, stream: TextIO, thread: threading.Thread):
        self.stream, self.thread = stream, thread

    def write(self, text: str) -> int:
        return len(text) if threading.current_thread() is self.thread else self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno... as the real stream's
        return getattr(self.stream, name)


@contextlib.contextmanager
def muted(name: str) -> Iterator[None]:
    """Drop what this thread prints on ``sys.stdout`` or ``sys.stderr`` (``name``) while the block runs, such as a
    library's progress lines, while other threads' output still gets through (``contextlib.redirect_stdout`` would
    swallow theirs too: the stream is the process's)."""
    stream = getattr(sys, name)
    setattr(sys, name, _MutedForThread(stream, threading.current_thread()))
    try:
        yield
    finally:
        setattr(sys, name, stream)


def notes_console() -> Console:
    """A rich console on stderr (stdout stays free for results a user pipes on), each note on one line whatever the
    terminal's width, so a path in it is never broken. Every command and the library's defaults use it."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)
