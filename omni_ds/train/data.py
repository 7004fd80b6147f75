"""The experiment's ``data:`` section turned into data_pipeline loaders for one rank.

``data_pipeline`` never imports ``omni_ds``; this is the one place training meets it. Every rank
builds the same epoch plan, so every rank yields the same number of batches (train and dev), as
the MoE all-to-all needs.
"""

from __future__ import annotations

from data_pipeline.loader import SpeechLoader
from data_pipeline.tokenizer import Tokenizer
from omni_ds.errors import ConfigError


def make_tokenizer(cfg) -> Tokenizer:
    tokenizer = Tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} pieces ({cfg.data.tokenizer}); set it to "
            f"{tokenizer.vocab_size}"
        )
    return tokenizer


def make_train_loader(cfg, rank: int, world_size: int) -> tuple[SpeechLoader, Tokenizer]:
    tokenizer = make_tokenizer(cfg)
    loader = SpeechLoader(
        cfg.data, tokenizer, rank=rank, world_size=world_size, seed=cfg.train.seed
    )
    return loader, tokenizer


def make_dev_sets(cfg, rank: int, world_size: int, tokenizer) -> dict[str, SpeechLoader]:
    """One unfiltered loader per dev set in ``data.dev`` (may be empty)."""
    return {
        name: SpeechLoader(
            cfg.data,
            tokenizer,
            rank=rank,
            world_size=world_size,
            seed=cfg.train.seed,
            shards=[path],
            train=False,
        )  # fmt: skip
        for name, path in cfg.data.dev.items()
    }
