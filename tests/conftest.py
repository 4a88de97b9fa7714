"""Session-wide test settings."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def private_user_cache(tmp_path_factory):
    """Token-block caches go to a folder of this test session, never the user's ~/.cache (subprocesses too)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
    yield
    mp.undo()
