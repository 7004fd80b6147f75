"""SentencePiece tokenizer: trained from shard transcripts, used by the loader and for decoding.

    train_tokenizer([Path("data/synth/train")], Path("data/synth/tokenizer"), vocab_size=128)
    tok = Tokenizer("data/synth/tokenizer.model")
    tok.decode(tok.encode("hello world")) == "hello world"

Token ids are SentencePiece ids; the CTC blank is ``vocab_size`` (one past the last id). Text is
normalised by ``data_pipeline.text.normalize`` before training and before every encoding, so
``decode`` gives the normalised (lower-case) form.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_pipeline.audio import AudioError
from data_pipeline.index import JSON_OFF, JSON_SIZE, LABEL_EXT, parse_label
from data_pipeline.remote import Remote
from data_pipeline.sources import open_shards
from data_pipeline.storage import open_shard
from data_pipeline.text import normalize


class Tokenizer:
    """A SentencePiece model; picklable (reloads from its path), so loader workers can use it."""

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.model_path = str(model_path)
        if not Path(self.model_path).is_file():
            raise FileNotFoundError(
                f"tokenizer {self.model_path!r} does not exist; train one with "
                "`omni-ds train-tokenizer SHARDS --vocab N --out PREFIX`"
            )
        self._sp = spm.SentencePieceProcessor(model_file=self.model_path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``normalize(text)``."""
        return self._sp.encode(normalize(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])


def shard_texts(
    source: str | Path, text_key: str = "text", remote: Remote | None = None
) -> Iterator[str]:
    """Every usable transcript of a shard source (``data_pipeline.sources``, URLs reached as
    ``remote`` says), in index order (labels only, no audio)."""
    shard_set = open_shards(source, text_key, remote=remote)
    for shard in shard_set.shards:
        f = open_shard(shard_set.path(shard["name"]), shard_set.remote)
        try:
            for row in shard["samples"]:
                ext = row[LABEL_EXT] if len(row) > LABEL_EXT else "json"
                raw = f.read(row[JSON_OFF], row[JSON_SIZE])
                try:
                    yield parse_label(raw, shard_set.text_key, ext)["text"]
                except AudioError:
                    continue
        finally:
            f.close()


def train_tokenizer(
    shard_dirs: Sequence[str | Path],
    prefix: Path,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    text_key: str = "text",
    remote: Remote | None = None,
) -> Path:
    """Train on the normalised transcripts of the shard sources ``shard_dirs``; writes
    ``PREFIX.model`` and ``PREFIX.vocab``.

    ``vocab_size`` is an upper bound: a small corpus may support fewer pieces.
    """
    import sentencepiece as spm

    texts = [normalize(t) for d in shard_dirs for t in shard_texts(d, text_key, remote)]
    if not texts:
        raise ValueError(f"no transcripts in {', '.join(map(str, shard_dirs))}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        hard_vocab_limit=False,
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    path = prefix.with_name(prefix.name + ".model")
    path.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    prefix.with_name(prefix.name + ".vocab").write_text(
        "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size()))
    )
    return path
