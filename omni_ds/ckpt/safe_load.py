"""Loading checkpoint files without running code from them.

``torch.load(weights_only=False)`` unpickles anything, so a checkpoint can carry a callable that
runs when it is loaded. Every load of a checkpoint file goes through :func:`safe_load`:
``weights_only=True`` plus an explicit allow-list of the few classes DeepSpeed 0.19 pickles
besides tensors and containers (:func:`allowed_globals`), in omni-ds's own readers and, through
:mod:`omni_ds.ckpt.engine_io`, inside DeepSpeed's ``load_checkpoint``. Anything else is refused
with :class:`CheckpointError` naming the file and the global.
"""

from __future__ import annotations

import functools
import pickle
import re
from pathlib import Path

import torch

from omni_ds.errors import CheckpointError


@functools.cache
def allowed_globals() -> tuple:
    """What DeepSpeed's checkpoint files hold besides tensors, containers and numbers: its ZeRO
    stage enum, the fragment addresses of ``param_slice_mappings`` and the loss scaler in ZeRO
    shards, and numpy arrays (the numpy RNG state omni-ds keeps in the client state)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    numpy = [np._core.multiarray._reconstruct, np.ndarray, np.dtype]
    numpy += [getattr(np.dtypes, name) for name in ("UInt32DType", "Float64DType", "Int64DType")]
    return (ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler, *numpy)


def safe_load(path: str | Path, *, map_location="cpu", mmap: bool = False):
    """``torch.load`` of a checkpoint file that can only build tensors, containers and the
    :func:`allowed_globals`; raises :class:`CheckpointError` for a file that holds anything
    else, is missing or cannot be read."""
    try:
        with torch.serialization.safe_globals(list(allowed_globals())):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise CheckpointError(
                f"{path} is damaged and cannot be read (UnpicklingError: {str(e)[:200]})"
            ) from e
        raise CheckpointError(
            f"{path} refused: it pickles {found.group(1)}, which is not one of the classes "
            "DeepSpeed stores (omni_ds.ckpt.safe_load.allowed_globals); loading it could run "
            "code, so it is not loaded"
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"{path} is damaged and cannot be read ({type(e).__name__}: {e})"
        ) from e
