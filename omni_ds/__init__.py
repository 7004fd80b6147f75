"""omni-ds: sparse Mixture-of-Experts CTC speech recognition with one router shared by all layers.

Importing the package imports neither torch nor DeepSpeed (``omni-ds --help`` stays quick). It
arranges for DeepSpeed's accelerator to be chosen when DeepSpeed is first imported, so no user
has to export ``DS_ACCELERATOR``: CUDA where a GPU is visible, the CPU accelerator (gloo)
otherwise. An explicit ``DS_ACCELERATOR`` always wins.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

__all__ = ["load_model", "__version__"]


def __getattr__(name: str):
    # The API needs torch; importing it only on first use keeps `import omni_ds` (and with it
    # `omni-ds --help`) light. tests/test_layout.py allows exactly this one upward import.
    if name == "load_model":
        from omni_ds.api import load_model

        return load_model
    raise AttributeError(f"module 'omni_ds' has no attribute {name!r}")


class _ChooseAccelerator:
    """A ``sys.meta_path`` entry that sets ``DS_ACCELERATOR`` just before ``import deepspeed``
    runs (DeepSpeed reads it once, at import), then steps aside; it finds no module itself."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "deepspeed":
            _sys.meta_path.remove(cls)
            if "DS_ACCELERATOR" not in _os.environ:
                import torch

                _os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
        return None


if "DS_ACCELERATOR" not in _os.environ and "deepspeed" not in _sys.modules:
    _sys.meta_path.insert(0, _ChooseAccelerator)
