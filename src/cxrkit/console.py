"""Where cxrkit's notes, warnings and progress bars go."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


def notes_console() -> Console:
    """A rich console on stderr (stdout stays free for results a user pipes on), each note on one line whatever the
    terminal's width, so a path in it is never broken. Every command and the library's defaults use it."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)
