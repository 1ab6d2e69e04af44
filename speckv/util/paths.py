"""Where SpecKV keeps downloaded and converted files."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: $SPECKV_CACHE, else $XDG_CACHE_HOME/speckv, else ~/.cache/speckv."""
    if env := os.environ.get("SPECKV_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "speckv"
