"""Errors raised by DeviceCloud. Each message names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DeviceCloudError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(DeviceCloudError, ValueError):
    """A configuration value is invalid (unknown name, out-of-range number, inconsistent settings)."""


class DatasetError(DeviceCloudError, ValueError):
    """A dataset file or row is malformed, or a split is empty."""


class DatasetWarning(UserWarning):
    """Problems of a dataset were skipped (their count is in `Task.skipped`); the message names the first."""


class IllegalActionError(DeviceCloudError, ValueError):
    """An action outside the action space, or a step after the episode ended."""


class PromptTooLongError(DeviceCloudError, ValueError):
    """A prompt does not fit in the environment's prompt window."""


class ModelNotFoundError(DeviceCloudError, FileNotFoundError):
    """A model directory is missing, incomplete or unreadable."""


class CloudError(DeviceCloudError, RuntimeError):
    """The cloud oracle failed after its retries (unreachable server, bad responses)."""


class DependencyNotInstalled(DeviceCloudError, ImportError):
    """An optional dependency is missing; the message names the pip extra that installs it."""


def unknown_name(kind: str, name: object, choices: Iterable[str], field: str | None = None) -> ConfigError:
    """A `ConfigError` for an unknown registry name, listing the valid names and the closest match."""
    choices = sorted(choices)
    where = f" ({field})" if field else ""
    close = difflib.get_close_matches(str(name), choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {kind} {name!r}{where}. Choose one of: {', '.join(choices)}.{hint}")
