"""The errors a user acts on; each message names what is wrong and the fix.

``omni-ds`` commands print these as one line and exit 2 instead of showing a traceback.
"""

from __future__ import annotations

from data_pipeline.index import StaleIndexError
from data_pipeline.loader import DataError

__all__ = ["USER_ERRORS", "CheckpointError", "ConfigError", "DataError"]


class ConfigError(ValueError):
    """A config value a user must change; the message names the key, the value and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, resumed or resharded; the message says why and what to do."""


USER_ERRORS = (ConfigError, CheckpointError, DataError, FileNotFoundError, StaleIndexError)
"""What ``omni-ds`` reports in one line (exit 2) rather than as a traceback."""
