"""Transcript normalisation: defined here once, applied by the tokenizer on both of its sides.

:func:`normalize` is what every transcript goes through before SentencePiece sees it, when a
tokenizer is trained (``data_pipeline.tokenizer.train_tokenizer``) and whenever text is encoded
(``Tokenizer.encode``: training targets, dev sets). Shards keep the transcript exactly as given,
so a corpus can be re-tokenised another way without re-sharding.

1. Unicode NFKC (full-width and compatibility forms become their plain letters);
2. lower case (LibriSpeech and Kaldi transcripts are upper case, most pseudo-labels are not: one
   case for all, so an upper-case corpus never meets a lower-case tokenizer as ``<unk>``);
3. runs of whitespace become one space, none at either end.

Punctuation and digits are kept: they are part of what a pseudo-label teaches.
"""

from __future__ import annotations

import unicodedata


def normalize(text: str) -> str:
    """``text`` as the tokenizer sees it (module docstring)."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())
