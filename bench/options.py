"""Command-line checks the benchmarks share, so that a bad option is a one-line error before anything is measured.

The scripts are run as ``python bench/<script>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def nonnegative(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def check_backbones(parser: argparse.ArgumentParser, names: list[str], option: str = "--backbones") -> None:
    """A one-line error (``parser.error``, naming ``option``) for a backbone cxrkit does not know."""
    from cxrkit.errors import CxrError
    from cxrkit.models.backbones import BACKBONES

    for name in names:
        try:
            BACKBONES.get(name)
        except CxrError as err:  # the registry's own message lists the names
            parser.error(f"{option}: {err}")
