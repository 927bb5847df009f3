"""Shared fixtures: small environments on the embedded tokenizer with a throwaway cloud cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import pytest

import collab_env  # noqa: F401  (registers the environments)

SMALL_TASK = {"name": "arithmetic", "num_train": 60, "num_test": 40}


@pytest.fixture
def cloud_cache(tmp_path) -> str:
    return str(tmp_path / "cloud.sqlite")


@pytest.fixture
def make_env(cloud_cache) -> Callable[..., gym.Env]:
    """`make_env(**kwargs)`: DeviceCloud-v0 on a small arithmetic task with a per-test cloud cache."""

    def make(**kwargs: Any) -> gym.Env:
        kwargs.setdefault("task", SMALL_TASK)
        cloud = kwargs.pop("cloud", {})
        if isinstance(cloud, dict):
            cloud = {"name": "simulated", "cache_path": cloud_cache, **cloud}
        return gym.make("DeviceCloud-v0", cloud=cloud, **kwargs)

    return make


def encode(env: gym.Env, text: str) -> list[int]:
    return env.unwrapped.tokenizer.encode(text, add_special_tokens=False)


def play(env: gym.Env, tokens: list[int]) -> tuple[float, bool, bool, dict]:
    """Step `tokens` until the episode ends; returns the last reward, flags and info."""
    for token in tokens:
        _, reward, terminated, truncated, info = env.step(token)
        if terminated or truncated:
            return reward, terminated, truncated, info
    raise AssertionError("the episode did not end")
