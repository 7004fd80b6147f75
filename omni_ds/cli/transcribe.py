"""Transcribe audio files with an exported model; prints one line per file: PATH<TAB>TEXT.

Files of any sample rate and channel count that soundfile reads (FLAC, WAV, OGG, ...) are mixed to
mono (or ``--channel N`` is kept) and resampled to 16 kHz, decoded in batches, with CTC greedy
decoding or, with --beam-size, a CTC prefix beam search.

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
    import numpy as np
    import torch

    from data_pipeline.audio import read_float
    from data_pipeline.reader import pad
    from omni_ds.ckpt.model_dir import load_model_dir
    from omni_ds.eval.inference import Transcriber

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    transcriber = Transcriber(load_model_dir(args.model, device), beam_size=args.beam_size)
    paths = list(args.audio)
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        channel = int(args.channel) if args.channel.isdigit() else args.channel
        audio, lens = pad([read_float(p, channel=channel) for p in chunk], np.float32)
        for path, text in zip(chunk, transcriber.texts(transcriber.decode(audio, lens))):
            print(f"{path}\t{text}", flush=True)
    return 0
