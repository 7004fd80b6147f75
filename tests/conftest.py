"""Session-wide test settings."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _index_cache(tmp_path_factory):
    """Indexes built in the cache directory (``data_pipeline.sources``) go to a temporary one,
    for this process and the ranks it starts, never to the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OMNI_DS_CACHE", str(tmp_path_factory.mktemp("omni-ds-cache")))
    yield
    mp.undo()
