"""DeepSpeed's own checkpoint reads and writes, routed through omni-ds's checks.

``save_checkpoint`` and ``load_checkpoint`` do every file operation through the engine's
``checkpoint_engine`` (``save(state_dict, path)``, ``load(path, map_location)``; DeepSpeed's
pluggable-engine interface). :func:`install` wraps it once per engine: each file a rank writes
is then digested and fsynced right after (:func:`omni_ds.ckpt.integrity.file_digest`, which
finds the bytes in the page cache) by a background thread, while DeepSpeed serializes the next
file, so that the disk works during the whole save; :meth:`CheckedCheckpointEngine.take_written`
waits for them. Each file the engine reads goes through
:func:`omni_ds.ckpt.safe_load.safe_load`, which DeepSpeed's ``torch.load(weights_only=False)``
would not.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from omni_ds.ckpt.integrity import file_digest
from omni_ds.ckpt.safe_load import safe_load
from omni_ds.errors import CheckpointError


class CheckedCheckpointEngine:
    """DeepSpeed's ``TorchCheckpointEngine`` with digests on save and safe loads."""

    def __init__(self, inner):
        self.inner = inner
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-digest")
        self._written: dict[str, Future] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        self.inner.save(state_dict, path)
        self._written[str(path)] = self._pool.submit(file_digest, Path(path), True)

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location or "cpu")

    def take_written(self) -> dict[str, tuple[int, str]]:
        """Path -> (size, digest) of every file saved since the last call, each on disk."""
        written, self._written = self._written, {}
        return {path: future.result() for path, future in written.items()}


def install(engine) -> CheckedCheckpointEngine:
    """Wrap ``engine``'s checkpoint engine (once); returns the wrapper."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if isinstance(current, CheckedCheckpointEngine):
        return current
    if type(current) is not TorchCheckpointEngine:
        # The others (Nebula, fast, decoupled) write in the background: a digest taken when
        # save() returns would describe a file still being written.
        raise CheckpointError(
            f"DeepSpeed's checkpoint engine is {type(current).__name__}; omni-ds checkpoints "
            "need its default TorchCheckpointEngine: drop the checkpoint writer options from the "
            "DeepSpeed JSON"
        )
    engine.checkpoint_engine = CheckedCheckpointEngine(current)
    return engine.checkpoint_engine
