"""Checkpoints: DeepSpeed's sharded ZeRO + expert-parallel files, made atomic, resharded and
exported.

| module | holds |
| --- | --- |
| ``format`` | the files on disk: names, reading one, the manifest, ``latest``, global expert ids |
| ``integrity`` | per-file checksums (xxh3-128) recorded at save, verified before loading |
| ``safe_load`` | ``torch.load(weights_only=True)`` with the allow-list of what DeepSpeed pickles |
| ``engine_io`` | DeepSpeed's own saves digested and fsynced, its loads made safe |
| ``saver`` | ``Checkpointer``: save with a manifest, ``latest``, keep-last-K, resume, RNG |
| ``select`` | which checkpoint a resume loads: the newest that verifies, or a refusal |
| ``rank_state`` | how per-rank state (counters, loader) merges and splits on a reshard |
| ``zero`` | the ZeRO-1/2 + MoE shard layout: read any parameter, plan another world size |
| ``reshard`` | rewrite a checkpoint for another world size / ep_size (also on ``--resume auto``) |
| ``consolidate`` | one fp32 state dict from the shards |
| ``model_dir`` / ``export`` | the self-contained model directory inference loads |
"""
