"""Training: the :class:`~omni_ds.train.trainer.Trainer` and the small components it owns.

| module | holds |
| --- | --- |
| ``trainer`` | ``Trainer``: resume → loop {step, log, maybe dev eval, maybe save}; ``omni-ds train`` |
| ``engine`` | the DeepSpeed engine with MoE parameter groups, monitors pointed into the run dir, W&B config |
| ``data`` | the ``data:`` section turned into this rank's train and dev loaders |
| ``dev_eval`` | dev loss and WER during training |
| ``metrics`` | ``metrics.jsonl``, DeepSpeed monitors, throughput, MFU, the expert-parallel grad norm |
| ``progress`` | rank 0's tqdm bar on a terminal, plain step and dev lines in log files |
| ``signals`` | SIGUSR1/SIGTERM → checkpoint at the next step, exit 75 |
| ``run_lock`` | one training per run dir: the lock rank 0 holds, stale locks, requeued SLURM jobs |
| ``launcher_watch`` | ranks whose launcher died stop without writing |
"""
