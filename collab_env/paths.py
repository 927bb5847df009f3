"""Where DeviceCloud keeps what it builds once and reuses: converted models, generated tasks, cloud answers,
and how a built file or directory is put there so that a half-written one is never used."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

CACHE_ENV_VAR = "DEVICECLOUD_CACHE"


def cache_dir() -> Path:
    """The user cache directory (`$DEVICECLOUD_CACHE`, else the platform's user cache dir)."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("devicecloud"))


def note(message: str) -> None:
    """A progress note on stderr (stdout stays the caller's), e.g. while something is built once."""
    print(f"[devicecloud] {message}", file=sys.stderr, flush=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place, so a half-written one is never used."""
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the file under a temporary name, which then replaces `path` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
