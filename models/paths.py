"""Where the project writes: one folder, ``$SEAL_HOME``, shared by every process and worker."""

from __future__ import annotations

import os
from pathlib import Path


def seal_home() -> Path:
    """``$SEAL_HOME`` (default ``./.seal``), the folder for everything the project writes."""
    return Path(os.environ.get("SEAL_HOME", ".seal")).absolute()
