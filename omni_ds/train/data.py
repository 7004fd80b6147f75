"""The experiment's ``data:`` section turned into data_pipeline loaders for one rank.

``data_pipeline`` never imports ``omni_ds``; this is the one place training meets it. Every rank
builds the same plan, so every rank yields the same number of batches (train and dev), as the MoE
all-to-all needs. Dev sets are read as ``omni-ds eval`` reads test sets (``data_pipeline.ordered``:
in order, unfiltered), except that an unusable sample is skipped and counted instead of stopping
the run.
"""

from __future__ import annotations

from data_pipeline.loader import SpeechLoader
from data_pipeline.ordered import OrderedReader
from data_pipeline.tokenizer import Tokenizer
from omni_ds.config.experiment import ExperimentConfig
from omni_ds.errors import ConfigError


def make_tokenizer(cfg: ExperimentConfig) -> Tokenizer:
    tokenizer = Tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} pieces ({cfg.data.tokenizer}); set it to "
            f"{tokenizer.vocab_size}"
        )
    return tokenizer


def make_train_loader(
    cfg: ExperimentConfig, rank: int, world_size: int
) -> tuple[SpeechLoader, Tokenizer]:
    tokenizer = make_tokenizer(cfg)
    loader = SpeechLoader(
        cfg.data, tokenizer, rank=rank, world_size=world_size, seed=cfg.train.seed
    )
    return loader, tokenizer


def make_dev_sets(
    cfg: ExperimentConfig, rank: int, world_size: int, tokenizer: Tokenizer
) -> dict[str, OrderedReader]:
    """One ordered, unfiltered reader per dev set in ``data.dev`` (may be empty), batched under
    the training's frame budget."""
    data = cfg.data
    return {
        name: OrderedReader(
            path,
            batch_seconds=data.max_batch_seconds,
            max_batch_size=data.max_batch_size,
            tokenizer=tokenizer,
            strict=False,
            rank=rank,
            world_size=world_size,
            num_workers=data.num_workers,
            prefetch_factor=data.prefetch_factor,
            text_key=data.text_key,
            remote=data.remote(),
        )
        for name, path in data.dev.items()
    }
