"""Subcommands of ``omni-ds``; see :mod:`omni_ds.cli` for how they are registered."""
