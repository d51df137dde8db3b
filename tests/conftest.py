"""Suite-wide settings."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches (decoded images) go to a folder of this test session, not the user's ~/.cache/cxrkit."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CXR_CACHE_DIR", str(tmp_path_factory.mktemp("cxr-cache")))
    yield
    mp.undo()
