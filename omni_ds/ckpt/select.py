"""Which checkpoint a run resumes from, verified: never a restart from step 0 by itself.

``auto`` takes the newest checkpoint of the run dir that verifies (every rank checks its share
of the files against the manifest's checksums: :func:`omni_ds.ckpt.format.verify`), and says on
stderr which newer ones it passed over and why. When the run dir holds checkpoints and none
verifies it refuses with :class:`CheckpointError` instead of training from step 0: that would
overwrite the run's checkpoints and redo its steps without anyone asking. A tag without a
manifest is an interrupted save, not a checkpoint, and is ignored.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from omni_ds import dist
from omni_ds.ckpt.format import MANIFEST, manifest_files, step_of, verify
from omni_ds.errors import CheckpointError


@dataclasses.dataclass
class Selection:
    path: Path | None
    """The checkpoint to load; None: start at step 0."""
    passed_over: list[str] = dataclasses.field(default_factory=list)
    """Newer checkpoints (tag names) that did not verify."""


def saved_tags(ckpt_dir: Path) -> list[Path]:
    """Tags whose save finished once (they have a manifest), newest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p for p in ckpt_dir.glob("step_*") if step_of(p.name) is not None
            and (p / MANIFEST).exists()]  # fmt: skip
    return sorted(tags, key=lambda p: step_of(p.name), reverse=True)


def problems(path: Path) -> list[str]:
    """What keeps checkpoint ``path`` from verifying, over all ranks (collective: each rank
    reads its share of the files)."""
    names = manifest_files(path)
    rank, world = dist.rank(), dist.world_size()
    mine = verify(path, names[rank::world]) if names else verify(path)
    found = [p for part in dist.gather_objects(mine) for p in part]
    return list(dict.fromkeys(found))  # without a manifest every rank reports the same


def select_resume(ckpt_dir: Path, resume: str) -> Selection:
    """The checkpoint ``resume`` (auto | none | a tag directory) selects in ``ckpt_dir``
    (collective: every rank gets the same answer)."""
    saved = dist.broadcast_object(saved_tags(ckpt_dir))  # rank 0's view of the file system
    if resume == "none":
        if saved:
            raise CheckpointError(
                f"{ckpt_dir} already holds checkpoints and checkpoint.resume is 'none'; use "
                "--resume auto to continue, or pick a new train.run_dir"
            )
        return Selection(None)
    if resume != "auto":
        found = problems(Path(resume))
        if found:
            raise CheckpointError(
                f"checkpoint.resume: {resume!r} is not a complete omni-ds checkpoint that "
                f"verifies ({found[0]}); name a RUN/checkpoints/step_N directory"
            )
        return Selection(Path(resume))
    reasons = []
    for path in saved:
        found = problems(path)
        if not found:
            if reasons and dist.rank() == 0:
                print(f"resuming from {path}, the newest checkpoint that verifies; passed over: "
                      f"{'; '.join(reasons)}", file=sys.stderr, flush=True)  # fmt: skip
            return Selection(path, [r.split(":")[0] for r in reasons])
        more = f" (and {len(found) - 1} more files)" if len(found) > 1 else ""
        reasons.append(f"{path.name}: {found[0]}{more}")
    if reasons:
        raise CheckpointError(
            f"{ckpt_dir} holds {len(reasons)} checkpoint(s) and none verifies, so the run is not "
            f"restarted from step 0 by itself: {'; '.join(reasons)}. To start again from step 0 "
            f"on purpose, move them aside (mv {ckpt_dir} {ckpt_dir}.damaged) and run with "
            "--resume none, or use a new train.run_dir"
        )
    return Selection(None)
