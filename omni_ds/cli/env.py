"""Show how this process would join a distributed job: launcher, rank, accelerator, backend.

Run it the way you run training (under srun, torchrun or deepspeed) to check the launch before
spending an allocation; ``--init`` also creates the process group and all-reduces a tensor.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--init",
        action="store_true",
        help="bring the process group up and all-reduce a test tensor",
    )


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import deepspeed
    import torch

    from omni_ds import dist

    report = {
        "launch": dataclasses.asdict(dist.detect_launch_env()),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if args.init:
        with dist.distributed() as info:
            total = torch.ones(1, device=info.device) * (info.rank + 1)
            torch.distributed.all_reduce(total)
            report.update(
                accelerator=info.accelerator,
                backend=info.backend,
                device=str(info.device),
                all_reduce_sum=total.item(),
                threads=torch.get_num_threads(),
            )
    print(json.dumps(report, sort_keys=True))
    return 0
