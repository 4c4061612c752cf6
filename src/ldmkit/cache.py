"""The user's cache folder for what ldmkit can recompute but should not have to every time."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/ldmkit, else ~/.cache/ldmkit (not created here)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldmkit"
