"""Bad configuration fails early with a message naming the field and the allowed values."""

from __future__ import annotations

import gymnasium as gym
import pytest

import collab_env  # noqa: F401
from collab_env import BudgetConfig, ConfigError, DeviceConfig, RewardConfig, TaskConfig
from collab_env.cloud import cloud_config


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: BudgetConfig(ratio=-0.1), "budget.ratio=-0.1 is out of range"),
        (lambda: BudgetConfig(ratio=1.5), "rho, cloud calls per local answer"),
        (lambda: BudgetConfig(mode="soft"), "Choose one of: cap, none, penalty, train"),
        (lambda: RewardConfig(alpha_a=0.2, alpha_c=0.3), "alpha_a > alpha_c"),
        (lambda: TaskConfig(template="tags"), "task.template"),
        (lambda: DeviceConfig(name="gpt5"), "device.name"),
        (lambda: DeviceConfig(name="path"), "needs device.path"),
        (lambda: cloud_config("opneai"), "unknown cloud 'opneai'"),
        (lambda: cloud_config({"name": "simulated", "acuracy": 0.9}), "unknown key\\(s\\) \\['acuracy'\\]"),
    ],
)
def test_bad_values_raise_config_error(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_env_rejects_bad_arguments_before_loading_anything():
    with pytest.raises(ConfigError, match="unknown task 'arithmatic'"):
        gym.make("DeviceCloud-v0", task="arithmatic", cloud={"name": "simulated", "cache_path": ":memory:"})
    with pytest.raises(ConfigError, match="env.max_new_tokens"):
        gym.make("DeviceCloud-v0", max_new_tokens=1)
    with pytest.raises(ConfigError, match="render_mode"):
        gym.make("DeviceCloud-v0", render_mode="human")


def test_share_is_rho_over_one_plus_rho():
    assert BudgetConfig().share == pytest.approx(0.3)
    assert BudgetConfig(ratio=1.0).share == pytest.approx(0.5)
