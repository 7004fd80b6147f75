"""Checkpoints: DeepSpeed's sharded ZeRO + expert-parallel files, made atomic, resharded and
exported.

| module | holds |
| --- | --- |
| ``format`` | the files on disk: names, reading one, the manifest, ``latest``, global expert ids |
| ``saver`` | ``Checkpointer``: save with a manifest, ``latest``, keep-last-K, resume, RNG |
| ``rank_state`` | how per-rank state (counters, loader) merges and splits on a reshard |
| ``zero`` | the ZeRO-1/2 + MoE shard layout: read any parameter, plan another world size |
| ``reshard`` | rewrite a checkpoint for another world size / ep_size (also on ``--resume auto``) |
| ``consolidate`` | one fp32 state dict from the shards |
| ``model_dir`` / ``export`` | the self-contained model directory inference loads |
"""
