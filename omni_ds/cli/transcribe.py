"""Transcribe audio files with an exported model; prints one line per file: PATH<TAB>TEXT.

Files of any sample rate and channel count that soundfile reads (FLAC, WAV, OGG, ...) are mixed to
mono (or ``--channel N`` is kept) and resampled to 16 kHz, decoded in batches, with CTC greedy
decoding or, with --beam-size, a CTC prefix beam search. The same as
``omni_ds.load_model(MODEL_DIR).transcribe(paths, channel=...)`` in Python.

    omni-ds transcribe models/omni a.flac b.wav --beam-size 8
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="written by omni-ds export")
    parser.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files")
    parser.add_argument(
        "--beam-size", type=int, default=0, help="CTC prefix beam search width; 0 = greedy"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="files per batch (default 16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument(
        "--channel",
        default="mix",
        metavar="N|mix",
        help="channel of multi-channel files: 0-based number, or mix (the default)",
    )


def run(args: argparse.Namespace) -> int:
    from omni_ds.api import load_model

    model = load_model(args.model, args.device)
    channel = int(args.channel) if args.channel.isdigit() else args.channel
    paths = list(args.audio)
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        texts = model.transcribe(chunk, beam_size=args.beam_size, channel=channel)
        for path, text in zip(chunk, texts):
            print(f"{path}\t{text}", flush=True)
    return 0
