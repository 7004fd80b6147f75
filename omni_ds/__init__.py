"""omni-ds: sparse Mixture-of-Experts CTC speech recognition with one router shared by all layers.

Importing the package selects DeepSpeed's accelerator before DeepSpeed is first imported, so no
user has to export ``DS_ACCELERATOR``: CUDA where a GPU is visible, the CPU accelerator (gloo)
otherwise. An explicit ``DS_ACCELERATOR`` always wins.
"""

import os as _os

if "DS_ACCELERATOR" not in _os.environ:
    import torch as _torch

    _os.environ["DS_ACCELERATOR"] = "cuda" if _torch.cuda.is_available() else "cpu"

__version__ = "0.1.0"

__all__ = ["load_model", "__version__"]


def __getattr__(name: str):
    # The API needs torch; importing it only on first use keeps `import omni_ds` (and with it
    # `omni-ds --help`) light. tests/test_layout.py allows exactly this one upward import.
    if name == "load_model":
        from omni_ds.api import load_model

        return load_model
    raise AttributeError(f"module 'omni_ds' has no attribute {name!r}")
