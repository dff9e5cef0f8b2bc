"""Where the project keeps what it computes once and reuses: features, generated datasets, checks."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """``$DIFFCOM_CACHE_DIR`` when set, else ``~/.cache/diffcom``; always absolute.

    Sweep trials change their working directory, so a relative cache path would split the cache.
    """
    configured = os.environ.get("DIFFCOM_CACHE_DIR")
    root = Path(configured).expanduser() if configured else Path.home() / ".cache" / "diffcom"
    return root.resolve()
