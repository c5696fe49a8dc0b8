"""Where every command finds its configuration (DESIGN: cli room)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONFIG = Path("/etc/postillon/postillon.toml")


def find_config(explicit: str | None) -> Path | None:
    """--config FILE, else $POSTILLON_CONFIG, else /etc/postillon/postillon.toml if it exists."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("POSTILLON_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None
