"""Loader throughput: the full pipeline vs decode-only (soundfile on the same FLAC bytes).

    .venv/bin/python benchmarks/loader.py                        # a fresh synthetic corpus
    .venv/bin/python benchmarks/loader.py --shards data/ls/train --tokenizer data/ls/tok.model

Decode-only is the ceiling: the FLAC bytes of every sample are read into memory first, then only
``soundfile.read`` is timed. The full pipeline is ``SpeechLoader`` in one process
(``num_workers=0``): epoch planning, reading members from the tar files, JSON labels, decoding,
checks, tokenisation, padding into tensors. Both run on one core and alternate batch by batch
(each batch's utterances are decoded again right after the loader produced it), so a shared
machine's load hits both alike. Prints audio-seconds per second per core and the ratio (target:
>= 0.70). ``--workers N`` adds the N-process loader for reference.
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
from data_pipeline.index import AUDIO_OFF, AUDIO_SIZE, KEY, load_index  # noqa: E402
from data_pipeline.loader import SpeechLoader  # noqa: E402
from data_pipeline.synth import generate  # noqa: E402
from data_pipeline.tokenizer import Tokenizer  # noqa: E402


def flac_bytes(directory: Path) -> dict[str, bytes]:
    blobs = {}
    for shard in load_index(directory).shards:
        with open(directory / shard["name"], "rb") as f:
            for row in shard["samples"]:
                f.seek(row[AUDIO_OFF])
                blobs[row[KEY]] = f.read(row[AUDIO_SIZE])
    return blobs


def interleaved(loader: SpeechLoader, blobs: dict[str, bytes]) -> tuple[float, float, float]:
    """One epoch: (pipeline seconds, decode-only seconds, audio seconds), batch by batch."""
    pipe = decode = audio = 0.0
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        mid = time.perf_counter()
        if batch is None:
            return pipe, decode, audio
        for key in batch["keys"]:
            sf.read(io.BytesIO(blobs[key]), dtype="float32")
        pipe, decode = pipe + mid - start, decode + time.perf_counter() - mid
        audio += int(batch["audio_lens"].sum()) / 16000


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
    blobs = flac_bytes(args.shards)
    loader = SpeechLoader(DataConfig(train=[args.shards], num_workers=0), tokenizer, seed=0)
    pipe = decode = audio = 0.0
    for _ in range(args.rounds):
        p, d, a = interleaved(loader, blobs)
        pipe, decode, audio = pipe + p, decode + d, audio + a
    decode_rate, pipe_rate = audio / decode, audio / pipe
    print(f"corpus: {len(blobs)} utterances, {audio / args.rounds / 60:.1f} min ({args.shards})")
    print(f"decode-only (soundfile, 1 core):      {decode_rate:8.0f} audio-s/s")
    print(f"full pipeline (SpeechLoader, 1 core): {pipe_rate:8.0f} audio-s/s")
    print(f"ratio pipeline / decode-only: {pipe_rate / decode_rate:.2f} (target >= 0.70)")
    if args.workers:
        cfg = DataConfig(train=[args.shards], num_workers=args.workers)
        start, loader = time.perf_counter(), SpeechLoader(cfg, tokenizer, seed=0)
        total = sum(int(b["audio_lens"].sum()) for b in loader) / 16000
        took = time.perf_counter() - start
        print(f"full pipeline, {args.workers} workers: {total / took:8.0f} audio-s/s in total")
    tmp.cleanup()


if __name__ == "__main__":
    main()
