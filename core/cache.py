"""Where qtool keeps what it derives once and reuses: converted GGUF models, tokenized texts."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$QTOOL_CACHE_DIR, else ~/.cache/qtool."""
    return Path(os.environ.get("QTOOL_CACHE_DIR") or Path.home() / ".cache" / "qtool").expanduser()
