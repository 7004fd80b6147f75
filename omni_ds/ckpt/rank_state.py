"""Per-rank state beside DeepSpeed's: how it merges and splits when a checkpoint is resharded.

Everything checkpointed speaks ``state_dict()`` / ``load_state_dict()``. A component's state is
the same on every rank except for counts of the rank's own work (samples read, audio seconds,
skips), which it keeps under the key :data:`TALLIES`: a mapping of numbers, or of names to
numbers. Resharding to another world size gives the new rank 0 every old rank's tallies summed,
the other new ranks zero tallies, and every new rank old rank 0's remaining state. A counter added
under ``tallies`` therefore carries over by itself: nothing here knows a component's field names.
"""

from __future__ import annotations

import copy
from typing import Any

TALLIES = "tallies"


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: _add(a.get(k, 0), b.get(k, 0)) for k in {**a, **b}}
    return a + b


def _zero(a: Any) -> Any:
    return {} if isinstance(a, dict) else type(a)(0)


def _map_tallies(states: list, combine) -> Any:
    """``states[0]`` with every ``tallies`` mapping (at any depth) replaced by ``combine`` of the
    same mapping in all of ``states``."""
    first = states[0]
    if not isinstance(first, dict):
        return copy.deepcopy(first)
    out = {}
    for key in first:
        parts = [s[key] for s in states]
        if key == TALLIES:
            out[key] = combine(parts)
        else:
            out[key] = _map_tallies(parts, combine)
    return out


def reshard_rank_states(states: list, world_size: int) -> list:
    """The per-rank states of ``len(states)`` old ranks dealt to ``world_size`` new ones."""
    summed = _map_tallies(states, _sum)
    zeroed = _map_tallies(states[:1], lambda parts: {k: _zero(v) for k, v in parts[0].items()})
    return [summed if r == 0 else copy.deepcopy(zeroed) for r in range(world_size)]


def _sum(values: list) -> Any:
    total = copy.deepcopy(values[0])
    for v in values[1:]:
        total = _add(total, v)
    return total
