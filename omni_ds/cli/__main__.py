"""``python -m omni_ds.cli``: what launchers run (``torchrun -m omni_ds.cli train ...``)."""

import sys

from omni_ds.cli import main

sys.exit(main())
