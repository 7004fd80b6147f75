"""Train an experiment with DeepSpeed: omni-ds train CONFIG.yaml [--set key=value ...].

Checks the config first (as ``omni-ds check-config`` does, for this launch's world size), then
trains; launch one process per GPU (on a CPU-only host the processes use gloo):

    torchrun --nproc_per_node 2 -m omni_ds.cli train CONFIG.yaml
    deepspeed --num_gpus 2 --module omni_ds.cli train CONFIG.yaml
    srun --ntasks-per-node 2 omni-ds train CONFIG.yaml

The run directory (``train.run_dir``) receives the resolved ``config.yaml``, ``metrics.jsonl``,
``tensorboard/`` and ``checkpoints/``.

Exit codes: 0 done; 75 a SIGUSR1/SIGTERM arrived, a checkpoint was written at the next step (none
when it came before the first step) and the job should be requeued (it resumes with the default
``--resume auto``); 2 config or data problems (data that cannot be trained on: no usable sample,
too many unusable ones), a checkpoint that cannot be resumed (none of the run dir's checkpoints
verifies, or one cannot be resharded for this world size), or a run dir that another training
holds, each said in one line; 70 the launcher died and this rank stopped; 1 any other error.
"""

from __future__ import annotations

import argparse

from omni_ds.cli.options import add_overrides_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, e.g. configs/tiny.yaml")
    add_overrides_argument(parser)
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto|none|PATH",
        help="auto: continue from the run dir's latest complete checkpoint (the default, "
        "checkpoint.resume in the YAML); none: start fresh; PATH: a checkpoint directory",
    )


def run(args: argparse.Namespace) -> int:
    from omni_ds.train.signals import StopRequest

    # First of all: a SIGUSR1/SIGTERM during the imports and start-up below is a stop request
    # (exit 75), not the end of the process.
    with StopRequest() as stop:
        return _train(args, stop)


def _train(args: argparse.Namespace, stop) -> int:
    import sys

    from omni_ds.errors import CheckpointError, ConfigError, DataError
    from omni_ds.train.run_lock import RunDirInUse
    from omni_ds.train.trainer import main

    try:
        return main(args.config, args.overrides, args.resume, stop=stop)
    except (ConfigError, DataError) as e:
        print(e, file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"cannot resume: {e}", file=sys.stderr)
        return 2
    except RunDirInUse as e:
        print(f"cannot train: {e}", file=sys.stderr)
        return 2
