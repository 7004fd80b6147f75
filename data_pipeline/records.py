"""What corpus readers produce: one :class:`Record` per utterance to shard, one :class:`Problem`
per input entry left out (``data_pipeline.manifests``, ``data_pipeline.cuts``)."""

from __future__ import annotations

import dataclasses
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


@dataclasses.dataclass
class Record:
    """One utterance to shard."""

    key: str
    """WebDataset key: letters, digits, ``_`` and ``-`` only (a dot would end the key)."""
    path: str
    """Audio file."""
    text: str
    start: float = 0.0
    """Offset into the file, seconds."""
    duration: float | None = None
    """Seconds from ``start``; None = to the end of the file."""
    meta: dict = dataclasses.field(default_factory=dict)
    """Extra label fields written to the sample's JSON (pseudo-label metadata, speaker, ...)."""
    channel: int | str | None = None
    """Channel of multi-channel audio: 0-based number, ``"mix"``, or None (auto, see
    ``data_pipeline.audio``)."""
    member: str | None = None
    """The audio is this member of the tar ``path`` (NeMo tarred datasets)."""


@dataclasses.dataclass
class Problem:
    """An input entry that is left out, with why; goes to the shard directory's report."""

    key: str
    source: str
    reason: str
    error: str


def safe_key(name: str) -> str:
    return _UNSAFE.sub("_", name)
