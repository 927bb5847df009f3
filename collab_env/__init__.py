"""DeviceCloud's environment side: Gymnasium environments for device-cloud LLM collaboration.

Importing this package registers `DeviceCloud-v0` (token level: every action writes a token or calls
for help) and `DeviceCloudRouting-v0` (one routing decision per prompt); `gym.make("collab_env:DeviceCloud-v0")`
imports it by itself. Nothing here imports `agents`.
"""

from __future__ import annotations

import gymnasium as gym

from collab_env.config import (
    BudgetConfig,
    CloudConfig,
    DeviceConfig,
    EnvConfig,
    RewardConfig,
    SimulatedCloudConfig,
    TaskConfig,
)
from collab_env.errors import (
    CloudError,
    ConfigError,
    DatasetError,
    DependencyNotInstalled,
    DeviceCloudError,
    IllegalActionError,
    ModelNotFoundError,
    PromptTooLongError,
)
from collab_env.tasks import HELP_MARKER

__version__ = "0.1.0"

gym.register(
    id="DeviceCloud-v0",
    entry_point="collab_env.env:DeviceCloudEnv",
    vector_entry_point="collab_env.vector_env:DeviceCloudVectorEnv",
)
gym.register(id="DeviceCloudRouting-v0", entry_point="collab_env.routing_env:DeviceCloudRoutingEnv")

__all__ = [
    "HELP_MARKER",
    "BudgetConfig",
    "CloudConfig",
    "CloudError",
    "ConfigError",
    "DatasetError",
    "DependencyNotInstalled",
    "DeviceCloudError",
    "DeviceConfig",
    "EnvConfig",
    "IllegalActionError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "RewardConfig",
    "SimulatedCloudConfig",
    "TaskConfig",
]
