"""Processes and their collectives: how a run joins its job (``launch``) and every collective
outside the model's all-to-all (``collectives``)."""

from omni_ds.dist.collectives import (
    agree,
    barrier,
    broadcast_object,
    gather_objects,
    mean_over_ranks,
    rank,
    sum_counts_over_ranks,
    sum_over_group,
    sum_over_ranks,
    sum_tensor_over_ranks,
    world_size,
)
from omni_ds.dist.launch import (
    DistInfo,
    LaunchEnv,
    detect_launch_env,
    distributed,
    init_distributed,
    seed_everything,
    shutdown,
    slurm_first_host,
)

__all__ = [
    "DistInfo",
    "LaunchEnv",
    "agree",
    "barrier",
    "broadcast_object",
    "detect_launch_env",
    "distributed",
    "gather_objects",
    "init_distributed",
    "mean_over_ranks",
    "rank",
    "seed_everything",
    "shutdown",
    "slurm_first_host",
    "sum_counts_over_ranks",
    "sum_over_group",
    "sum_over_ranks",
    "sum_tensor_over_ranks",
    "world_size",
]
