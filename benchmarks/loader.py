"""Loader throughput: the full pipeline vs decode-only (soundfile on the same FLAC bytes).

    .venv/bin/python benchmarks/loader.py                        # a fresh synthetic corpus
    .venv/bin/python benchmarks/loader.py --shards data/ls/train --tokenizer data/ls/tok.model

Decode-only is the ceiling: the FLAC bytes of every sample are read into memory first, then only
``soundfile.read`` is timed. The full pipeline is ``SpeechLoader`` in one process
(``num_workers=0``): epoch planning, reading members from the tar files, JSON labels, decoding,
checks, tokenisation, padding into tensors. Both run on one core; rounds alternate between the two
and the best of each is kept, so machine load hits both alike. Prints audio-seconds per second per
core and the ratio (target: >= 0.70). ``--workers N`` adds the N-process loader for reference.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.config import DataConfig  # noqa: E402
from data_pipeline.index import AUDIO_OFF, AUDIO_SIZE, SECONDS, load_index  # noqa: E402
from data_pipeline.loader import SpeechLoader  # noqa: E402
from data_pipeline.synth import generate  # noqa: E402
from data_pipeline.tokenizer import Tokenizer  # noqa: E402


def flac_bytes(directory: Path) -> tuple[list[bytes], float]:
    blobs, seconds = [], 0.0
    for shard in load_index(directory).shards:
        with open(directory / shard["name"], "rb") as f:
            for row in shard["samples"]:
                f.seek(row[AUDIO_OFF])
                blobs.append(f.read(row[AUDIO_SIZE]))
                seconds += row[SECONDS]
    return blobs, seconds


def decode_only(blobs: list[bytes]) -> float:
    start = time.perf_counter()
    for b in blobs:
        sf.read(io.BytesIO(b), dtype="float32")
    return time.perf_counter() - start


def pipeline(loader: SpeechLoader) -> tuple[float, float]:
    """(seconds taken, audio seconds yielded) for one epoch."""
    start = time.perf_counter()
    audio = sum(int(batch["audio_lens"].sum()) for batch in loader) / 16000
    return time.perf_counter() - start, audio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="shard directory (default: generate one)")
    parser.add_argument("--tokenizer", type=Path, help="SentencePiece model (with --shards)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="also time N loader workers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="omni-ds-bench-")
    if args.shards is None:
        generate(Path(tmp.name), train_utterances=1200, workers=1, progress=False)
        args.shards, args.tokenizer = Path(tmp.name) / "train", Path(tmp.name) / "tokenizer.model"
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else None
    blobs, corpus_seconds = flac_bytes(args.shards)
    cfg = DataConfig(train=[args.shards], num_workers=0)
    loader = SpeechLoader(cfg, tokenizer, seed=0)
    best_decode = best_pipe = float("inf")
    for _ in range(args.rounds):
        best_decode = min(best_decode, decode_only(blobs))
        took, audio = pipeline(loader)
        best_pipe = min(best_pipe, took)
    decode_rate, pipe_rate = corpus_seconds / best_decode, audio / best_pipe
    print(
        f"corpus: {len(blobs)} utterances, {corpus_seconds / 60:.1f} min of audio ({args.shards})"
    )
    print(f"decode-only (soundfile, 1 core):   {decode_rate:8.0f} audio-s/s")
    print(f"full pipeline (SpeechLoader, 1 core): {pipe_rate:8.0f} audio-s/s")
    print(f"ratio pipeline / decode-only: {pipe_rate / decode_rate:.2f} (target >= 0.70)")
    if args.workers:
        cfg = DataConfig(train=[args.shards], num_workers=args.workers)
        took, audio = pipeline(SpeechLoader(cfg, tokenizer, seed=0))
        print(f"full pipeline, {args.workers} workers: {audio / took:8.0f} audio-s/s in total")
    tmp.cleanup()


if __name__ == "__main__":
    main()
