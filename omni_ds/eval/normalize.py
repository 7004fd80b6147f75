"""The text normalisers applied to references and hypotheses before WER and CER.

``omni`` (the default) is :func:`normalize_english` below; ``whisper`` is Whisper's
``EnglishTextNormalizer`` from the ``whisper-normalizer`` package (what leaderboards and the
paper's comparison with Whisper use: it also spells numbers as digits, expands contractions,
maps British to American spelling and drops fillers such as "um"); ``none`` leaves the text as
it is (jiwer still splits words on whitespace). :func:`get_normalizer` returns one by name.

It is deliberately small and fully specified, so that a WER computed here can be reproduced
elsewhere. :func:`normalize_english` does exactly these steps, in order:

1. Unicode NFKC (full-width and compatibility forms become their plain equivalents), then
   ``str.casefold()`` (lower case, also for non-ASCII letters).
2. Annotation tags in square or angle brackets are removed with their content: ``[noise]``,
   ``<unk>``, ``[laughter]`` (the Kaldi/LibriSpeech conventions for non-speech events).
3. Typographic apostrophes (``’ ‘ ʼ``) become ``'``. An apostrophe between two letters stays
   (``don't``, ``o'clock``); every other apostrophe is dropped (``'cause`` → ``cause``).
4. Inside numbers, ``,`` is removed and ``.`` kept (``1,000.5`` → ``1000.5``).
5. Every remaining character that Unicode classes as punctuation (P*) or symbol (S*), hyphens
   and dashes included, becomes a space (``well-known`` → ``well known``, ``"hi!"`` → ``hi``).
6. Runs of whitespace become one space; leading and trailing whitespace is removed.

It does not spell out numbers, expand contractions or abbreviations, or map British to American
spelling (Whisper's normaliser does); a model that writes ``2`` for ``two`` is scored as an error.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

NORMALIZERS = ("omni", "whisper", "none")

_TAG = re.compile(r"\[[^\]]*\]|<[^>]*>")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
_INNER_APOSTROPHE = "\x00"  # placeholder that survives the punctuation pass
_KEEP_APOSTROPHE = re.compile(r"(?<=[^\W\d_])'(?=[^\W\d_])")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
_DECIMAL_MARK = "\x01"


def normalize_english(text: str) -> str:
    """``text`` normalised as described in the module docstring (steps 1-6)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _TAG.sub(" ", text)
    text = text.translate(_APOSTROPHES)
    text = _KEEP_APOSTROPHE.sub(_INNER_APOSTROPHE, text)
    text = _THOUSANDS.sub("", text)
    text = _DECIMAL.sub(_DECIMAL_MARK, text)
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    text = text.replace(_INNER_APOSTROPHE, "'").replace(_DECIMAL_MARK, ".")
    return " ".join(text.split())


def _unchanged(text: str) -> str:
    return text


def get_normalizer(name: str) -> Callable[[str], str]:
    """The normaliser called ``name``: one of :data:`NORMALIZERS`."""
    if name == "omni":
        return normalize_english
    if name == "whisper":
        from whisper_normalizer.english import EnglishTextNormalizer

        return EnglishTextNormalizer()
    if name == "none":
        return _unchanged
    raise ValueError(f"normalizer {name!r} is unknown; use one of {', '.join(NORMALIZERS)}")
