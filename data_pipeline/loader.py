"""The training loader: planned, duration-bucketed batches of padded 16 kHz audio and tokens.

    loader = SpeechLoader(cfg.data, tokenizer, rank=rank, world_size=world, seed=seed)
    loader.load_state_dict(saved)          # optional: resume mid-epoch, any world size
    for epoch in range(n):
        for batch in loader:               # one epoch; the next ``iter`` starts the next epoch
            ...                            # batch: audio [B,S] f32, audio_lens, tokens [B,U],
                                           #        token_lens, keys, texts, bucket
        saved = loader.state_dict()        # also valid mid-epoch, after any batch

Each rank computes the same epoch plan (``data_pipeline.plan``) from the shard indexes, so all
ranks yield the same number of batches and draw the same duration bucket at each step, with no
collective. Decoding runs in ``num_workers`` processes (``data_pipeline.reader``), which ignore
SIGUSR1/SIGTERM: the training process decides when to stop. ``state_dict()`` counts the batches
*yielded*, not those prefetched, so a resume continues exactly after the last batch the trainer
took. The state is the same on every rank, so any rank's state resumes any world size.

Unusable samples are skipped and counted per reason (:meth:`skipped`); when more than
``max_error_rate`` of the samples read are unusable, :class:`DataError` stops the run naming the
worst shards.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from data_pipeline.config import DataConfig
from data_pipeline.index import load_index
from data_pipeline.plan import Catalog, apply_filters, plan_epoch, share_of_rank
from data_pipeline.reader import ERROR_REASONS, BatchReader

STATE_VERSION = 2


class DataError(RuntimeError):
    """Too much of the data is unusable; the message names the worst shards."""


def _ignore_stop_signals(_worker_id: int) -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


# Workers start from a single-threaded fork server, never by forking the trainer itself: a trainer
# runs gloo/NCCL, tqdm and queue-feeder threads, and a fork taken while one of them holds
# CPython's thread-state lock leaves the child stuck in its after-fork clean-up (seen: a dev-set
# worker hung in _PyThreadState_DeleteExcept while the other rank waited in the MoE all-to-all).
_WORKER_CONTEXT = multiprocessing.get_context("forkserver")
_WORKER_CONTEXT.set_forkserver_preload(["data_pipeline.reader"])


def _ensure_fork_server() -> None:
    """Start the fork server with the stop signals ignored (kept across its exec and inherited
    by every worker), so SIGUSR1/SIGTERM sent to the trainer's process group reach the trainer
    alone."""
    stops = (signal.SIGUSR1, signal.SIGTERM)
    old = [signal.signal(s, signal.SIG_IGN) for s in stops]
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for s, handler in zip(stops, old):
            signal.signal(s, handler)


# Workers ignore SIGTERM, so neither torch's fallback (``terminate()``) nor multiprocessing's exit
# handler (terminate, then join without a timeout) can end a straggler: a worker still alive when
# the trainer exits (say with 75 after SIGUSR1, its epoch iterator abandoned) would hang the exit
# forever. The loader therefore ends its workers itself, with SIGKILL if they do not leave.
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _stop_workers(it) -> None:
    workers = list(getattr(it, "_workers", ()))
    it._shutdown_workers()  # the polite way: sentinel, join with a timeout
    for w in workers:
        if w.is_alive():
            os.kill(w.pid, signal.SIGKILL)
            w.join()
    _LIVE.discard(it)


# Registered after multiprocessing's own exit handler, so it runs before it.
atexit.register(lambda: [_stop_workers(it) for it in list(_LIVE)])


class _PlannedBatches(torch.utils.data.Dataset):
    def __init__(self, reader: BatchReader, batches: list[list[int]], buckets: list[int]):
        self.reader, self.batches, self.buckets = reader, batches, buckets

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.reader.read_batch(self.batches[i], self.buckets[i])


class SpeechLoader:
    """Batches of one rank (see the module docstring).

    ``shards`` overrides ``cfg.train`` (e.g. a dev set); ``train=False`` turns the metadata
    filters off (evaluation keeps every readable utterance). ``tokenizer`` may be None, which
    gives empty ``tokens``.
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer=None,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shards: Sequence[str | Path] | None = None,
        train: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, seed
        self.catalog = Catalog.from_sets([load_index(d) for d in (shards or cfg.train)])
        self.kept, self._plan_skips = apply_filters(self.catalog, cfg if train else None)
        self.reader = BatchReader(self.catalog, tokenizer)
        self.epoch = 0
        self._segments = [[world_size, 0]]
        self._counted = False
        self._skipped: Counter = Counter()
        self._shard_errors: Counter = Counter()
        self._read = 0

    def __len__(self) -> int:
        """Batches this rank still yields in the current epoch."""
        return len(self._plan().steps) - self._segments[-1][1]

    def _plan(self):
        return plan_epoch(
            self.kept, self.catalog.seconds, self.cfg, self.seed, self.epoch, self._segments
        )

    def __iter__(self) -> Iterator[dict]:
        plan = self._plan()
        if plan.steps and self._segments[-1][1] >= len(plan.steps):
            self._finish_epoch(plan)  # a state taken after an epoch's last batch, before its end
            plan = self._plan()
        if not self._counted:
            # Samples the plan leaves out are counted once per epoch, each on one rank.
            skips = share_of_rank(self._plan_skips, self.rank, self.world_size)
            self._skipped.update(skips)
            self._read += sum(skips[r] for r in ERROR_REASONS)
            # The index's bad entries lead that list, so this rank's share of them is:
            for sid, _, _ in self.catalog.bad[self.rank :: self.world_size]:
                self._shard_errors[self.catalog.shard_paths[sid]] += 1
            self._counted = True
        if not plan.steps:
            self._finish_epoch(plan)
            return
        done = self._segments[-1][1]
        mine = [step[self.rank] for step in plan.steps[done:]]
        batches = self._batches(mine, plan.buckets[done:])
        try:
            for batch in batches:
                self._segments[-1][1] += 1
                self._account(batch)
                if self._segments[-1][1] == len(plan.steps):
                    # Before the last batch leaves: a state taken after it starts the next epoch.
                    self._finish_epoch(plan)
                yield batch
        finally:
            if batches in _LIVE:
                _stop_workers(batches)

    def _finish_epoch(self, plan) -> None:
        dropped = ["rank_remainder"] * len(plan.dropped)
        self._skipped.update(share_of_rank(dropped, self.rank, self.world_size))
        self.epoch += 1
        self._segments = [[self.world_size, 0]]
        self._counted = False

    def _batches(self, batches: list[list[int]], buckets: list[int]) -> Iterator[dict]:
        dataset = _PlannedBatches(self.reader, batches, buckets)
        if self.cfg.num_workers == 0:
            return (dataset[i] for i in range(len(dataset)))
        _ensure_fork_server()
        it = iter(
            torch.utils.data.DataLoader(
                dataset,
                batch_size=None,
                num_workers=min(self.cfg.num_workers, max(1, len(dataset))),
                prefetch_factor=self.cfg.prefetch_factor,
                worker_init_fn=_ignore_stop_signals,
                multiprocessing_context=_WORKER_CONTEXT,
                # The workers' base seed comes from a private generator: starting an epoch never
                # draws from the trainer's global RNG (dropout, SpecAugment, CAPE), so a resumed
                # run draws exactly what the uninterrupted run drew.
                generator=torch.Generator().manual_seed(self.seed),
            )
        )
        _LIVE.add(it)
        return it

    def _account(self, batch: dict) -> None:
        self._skipped.update(batch.pop("_skipped"))
        self._shard_errors.update(batch.pop("_shard_errors"))
        self._read += batch.pop("_read")
        errors = sum(self._skipped[r] for r in ERROR_REASONS)
        if (
            self._read >= self.cfg.error_rate_min_samples
            and errors > self.cfg.max_error_rate * self._read
        ):
            worst = ", ".join(f"{p} ({n})" for p, n in self._shard_errors.most_common(3))
            raise DataError(
                f"{errors} of {self._read} samples read on rank {self.rank} were unusable "
                f"({dict(self._skipped)}), above data.max_error_rate={self.cfg.max_error_rate}; "
                f"worst shards: {worst or 'none (bad entries in the index)'}. Fix or re-create "
                "those shards, or raise data.max_error_rate"
            )

    def skipped(self) -> dict[str, int]:
        """Samples skipped on this rank so far, per reason (cumulative over epochs)."""
        return dict(self._skipped)

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "segments": [list(s) for s in self._segments],
            "counted": self._counted,
            # This rank's own counts: a reshard sums them onto one rank (omni_ds.ckpt.rank_state).
            "tallies": {
                "skipped": dict(self._skipped),
                "shard_errors": dict(self._shard_errors),
                "read": self._read,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch yielded when ``state`` was taken, on this world size."""
        if state.get("version") == 1:  # the counts were top-level keys
            state = {**state, "tallies": {k: state[k] for k in ("skipped", "shard_errors", "read")}}
        elif state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown loader state version {state.get('version')!r}")
        if state["seed"] != self.seed:
            raise ValueError(
                f"the loader state was taken with seed {state['seed']}, this loader has "
                f"{self.seed}; resume with the original train.seed"
            )
        self.epoch = state["epoch"]
        segments = [list(s) for s in state["segments"]]
        if segments[-1][0] != self.world_size:
            # Keep the consumed part of the old layout; plan the rest for this world size.
            if segments[-1][1] == 0:
                segments.pop()
            segments.append([self.world_size, 0])
        self._segments = segments
        self._counted = state["counted"]
        tallies = state["tallies"]
        self._skipped = Counter(tallies["skipped"])
        self._shard_errors = Counter(tallies["shard_errors"])
        self._read = tallies["read"]
