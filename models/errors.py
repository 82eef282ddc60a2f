"""The errors a user can cause and fix: each message says what was wrong and how to fix it.

The ``seal`` command reports the first four as one line (no traceback) and exits with status 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override is invalid; the message lists every problem."""


class ModelNotFoundError(FileNotFoundError):
    """A model spec could not be resolved; the message says how to get the model."""


class DatasetError(ValueError):
    """A data source is missing or malformed; the message names the file, record and field."""


class UnknownTaskError(ValueError):
    """A requested ARC task id is not in the split."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the self-edit earns no reward."""
