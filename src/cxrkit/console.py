"""Where cxrkit's notes, warnings and progress bars go."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


@contextlib.contextmanager
def quiet_logger(name: str | None = None) -> Iterator[None]:
    """Hold back a library's log lines below ERROR on the logger ``name`` (None: the root logger) while the block
    runs; errors still show, and the level is put back afterwards."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def notes_console() -> Console:
    """A rich console on stderr (stdout stays free for results a user pipes on), each note on one line whatever the
    terminal's width, so a path in it is never broken. Every command and the library's defaults use it."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)
