"""Export a trained checkpoint into a self-contained model directory.

Consolidates a sharded ZeRO + expert-parallel DeepSpeed checkpoint (any number of ranks, any
ep_size, fp32 or bf16 training) into MODEL_DIR/ with fp32 ``model.safetensors`` (the shared
router stored once), the run's resolved ``config.yaml`` and the SentencePiece ``tokenizer.model``.
Runs on one CPU process; no DeepSpeed launch needed.

    omni-ds export runs/omni --out models/omni                      # the latest checkpoint
    omni-ds export runs/omni/checkpoints/step_4000 --out models/omni_4k
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="RUN_DIR|CHECKPOINT",
        help="a run dir (its latest checkpoint), RUN_DIR/checkpoints, or a checkpoint tag dir",
    )
    parser.add_argument("--out", required=True, metavar="MODEL_DIR", help="directory to write")
    parser.add_argument(
        "--config",
        default=None,
        help="the run's resolved config.yaml (default: RUN_DIR/config.yaml of the checkpoint)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="SentencePiece .model file (default: the config's data.tokenizer)",
    )


def run(args: argparse.Namespace) -> int:
    from omni_ds.ckpt.export import export_checkpoint
    from omni_ds.ckpt.model_dir import read_weights

    out = export_checkpoint(
        args.checkpoint, args.out, config_path=args.config, tokenizer=args.tokenizer
    )
    tensors, meta = read_weights(out)
    params = sum(t.numel() for t in tensors.values())
    print(
        f"exported step {meta['global_steps']} of {meta['source']} to {out}: "
        f"{len(tensors)} tensors, {params:,} values (fp32 masters: {meta['fp32_masters']})"
    )
    return 0
