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
collective. Decoding runs in ``num_workers`` processes (``data_pipeline.reader`` in the workers of
``data_pipeline.workers``), which ignore SIGUSR1/SIGTERM: the training process decides when to
stop. ``state_dict()`` counts the batches *yielded*, not those prefetched, so a resume continues
exactly after the last batch the trainer took. The state is the same on every rank, so any
rank's state resumes any world size.

Unusable samples are skipped and counted per reason (:meth:`skipped`); when more than
``max_error_rate`` of the samples read are unusable, :class:`DataError` stops the run naming the
worst shards, and when more than ``max_unk_rate`` have ``<unk>`` in their targets, naming the
tokenizer. Sources with no usable sample at all are refused when the loader is built.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from data_pipeline.config import DataConfig
from data_pipeline.plan import Catalog, apply_filters, plan_epoch, share_of_rank
from data_pipeline.reader import (
    ERROR_REASONS,
    UNK_REASON,
    BatchReader,
    DataError,
    PlannedBatches,
)
from data_pipeline.sources import open_shards
from data_pipeline.workers import worker_batches

__all__ = ["DataError", "SpeechLoader"]

STATE_VERSION = 2


def no_usable_samples(sources, reasons: list[str]) -> str:
    """The message for sources that leave no sample to train on."""
    return (
        f"{', '.join(map(str, sources))}: no usable sample ({len(reasons)} left out: "
        f"{dict(Counter(reasons)) or 'the shards hold no samples'}); fix the shards or the "
        "data filters (min_duration, max_duration, chars per second, min_pl_confidence)"
    )


def unk_message(unk: int, read: int, ceiling: float, tokenizer) -> str:
    """The message for transcripts the tokenizer does not cover."""
    return (
        f"{unk} of {read} transcripts have <unk> in their targets, above data.max_unk_rate="
        f"{ceiling}: the tokenizer {tokenizer} was trained on other text. Train one on these "
        "shards (`omni-ds train-tokenizer SHARDS --vocab N --out PREFIX`, then set "
        "data.tokenizer and model.vocab_size), or raise data.max_unk_rate"
    )


class SpeechLoader:
    """Batches of one rank (see the module docstring). ``tokenizer`` may be None, which gives
    empty ``tokens``. Dev and test sets are read by ``data_pipeline.ordered`` instead: in order,
    unfiltered."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer=None,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, seed
        remote = cfg.remote()
        sets = [open_shards(spec, cfg.text_key, progress=rank == 0, remote=remote)
                for spec in cfg.train]  # fmt: skip
        self.catalog = Catalog.from_sets(sets)
        self.kept, self._plan_skips = apply_filters(self.catalog, cfg)
        if not len(self.kept):
            raise DataError(no_usable_samples(cfg.train, self._plan_skips))
        self.reader = BatchReader(self.catalog, tokenizer)
        self.epoch = 0
        self._segments = [[world_size, 0]]
        self._counted = False
        self._skipped: Counter = Counter()
        self._shard_errors: Counter = Counter()
        self._read = 0
        self._retries = 0

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
        dataset = PlannedBatches(self.reader, mine, plan.buckets[done:])
        workers = dict(num_workers=self.cfg.num_workers, prefetch_factor=self.cfg.prefetch_factor)
        with worker_batches(dataset, **workers, seed=self.seed) as batches:
            for batch in batches:
                self._segments[-1][1] += 1
                self._account(batch)
                if self._segments[-1][1] == len(plan.steps):
                    # Before the last batch leaves: a state taken after it starts the next epoch.
                    self._finish_epoch(plan)
                yield batch

    def _finish_epoch(self, plan) -> None:
        dropped = ["rank_remainder"] * len(plan.dropped)
        self._skipped.update(share_of_rank(dropped, self.rank, self.world_size))
        self.epoch += 1
        self._segments = [[self.world_size, 0]]
        self._counted = False

    def _account(self, batch: dict) -> None:
        self._skipped.update(batch.pop("_skipped"))
        self._shard_errors.update(batch.pop("_shard_errors"))
        self._read += batch.pop("_read")
        self._retries += batch.pop("_retries")
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
        unk = self._skipped[UNK_REASON]
        if (
            self._read >= self.cfg.error_rate_min_samples
            and unk > self.cfg.max_unk_rate * self._read
        ):
            raise DataError(unk_message(unk, self._read, self.cfg.max_unk_rate, self.cfg.tokenizer))

    def skipped(self) -> dict[str, int]:
        """Samples skipped on this rank so far, per reason (cumulative over epochs)."""
        return dict(self._skipped)

    def retries(self) -> int:
        """Transient storage failures retried on this rank so far (``data_pipeline.remote``)."""
        return self._retries

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
                "retries": self._retries,
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
        self._retries = tallies.get("retries", 0)  # states saved before URL sources existed
