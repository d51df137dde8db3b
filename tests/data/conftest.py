"""Fixtures for the data tests; the real data in ``$CXR_SHARED/data`` is optional (tests skip without it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``$CXR_SHARED/data`` (default ``<repo>/../shared/data``); skips the test when it is absent."""
    root = Path(os.environ.get("CXR_SHARED", REPO.parent / "shared")) / "data"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set CXR_SHARED)")
    return root
