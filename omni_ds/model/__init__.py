"""The CTC speech encoder with Mixture-of-Experts feed-forward layers, read in this order:

| module | holds |
| --- | --- |
| ``router`` | :class:`Router`: W_r and top-1/top-2 gating of the real frames (start here) |
| ``moe`` | :class:`MoEFeedForward`: DeepSpeed's expert-parallel ``MoE`` block routed by a Router |
| ``balance`` | the expert-bias update of auxiliary-loss-free balancing (:class:`LoadMeter`) |
| ``dispatch`` | the padding-free grouped dispatch (all-to-all with exact split sizes) |
| ``frontend`` | waveform → log-mel → SpecAugment → 40 ms frames |
| ``encoder`` | :class:`SpeechEncoder`: makes the routers (one shared for omni, or one per group
  of layers, one per layer for switch), the blocks and the CTC loss; :func:`build_model` |
| ``decode`` | CTC greedy and prefix beam search on the logits |

The configs these are built from are in :mod:`omni_ds.config.model`.
"""

from omni_ds.model.encoder import SpeechEncoder, build_model
from omni_ds.model.router import Router

__all__ = ["Router", "SpeechEncoder", "build_model"]
