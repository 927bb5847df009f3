"""Where DeviceCloud keeps what it builds once and reuses: converted models, generated tasks, cloud answers."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "DEVICECLOUD_CACHE"


def cache_dir() -> Path:
    """The user cache directory (`$DEVICECLOUD_CACHE`, else the platform's user cache dir)."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("devicecloud"))
