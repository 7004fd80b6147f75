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


@pytest.fixture(autouse=True, scope="session")
def _no_torch_compile():
    """omni-ds compiles nothing, but every ZeRO engine start imports DeepSpeed's Muon optimizer
    (``is_zero_supported_optimizer``), whose ``torch.compile`` decorators import Inductor: ~1.8 s
    of CPU per rank, ~3 s of each 2-rank test launch here. TorchDynamo's own switch turns those
    decorators into no-ops, for this process and every rank or job it starts."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHDYNAMO_DISABLE", "1")
    yield
    mp.undo()
