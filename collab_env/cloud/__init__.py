"""Cloud oracles, swapped by config, all behind the persistent answer cache.

`make_oracle(config, task)` returns a `CachedOracle`. Oracles register here with their config
class; backends with heavy dependencies are imported only when chosen.
"""

from __future__ import annotations

import importlib
from typing import Any

from collab_env.cloud.base import CloudAnswer, CloudOracle, CloudStats
from collab_env.cloud.cache import AnswerCache, CachedOracle
from collab_env.cloud.settings import OpenAICloudConfig, TransformersCloudConfig, VLLMCloudConfig
from collab_env.config import CloudConfig, SimulatedCloudConfig, coerce
from collab_env.errors import ConfigError, unknown_name
from collab_env.paths import cache_dir
from collab_env.tasks import Task

CLOUD_CONFIGS: dict[str, type[CloudConfig]] = {"simulated": SimulatedCloudConfig}
"""Oracle name -> its config class (what `gym.make(..., cloud={...})` and Hydra's `cloud` group build)."""

_ORACLES: dict[str, str] = {"simulated": "collab_env.cloud.simulated:SimulatedOracle"}
"""Oracle name -> "module:Class", imported when the oracle is made."""


def register_oracle(name: str, config_class: type[CloudConfig], oracle_path: str) -> None:
    """Add an oracle under `name`; a second registration of a taken name with other classes is an error."""
    if name in _ORACLES and (_ORACLES[name], CLOUD_CONFIGS[name]) != (oracle_path, config_class):
        raise ValueError(f"cloud oracle {name!r} is already registered as {_ORACLES[name]}")
    CLOUD_CONFIGS[name] = config_class
    _ORACLES[name] = oracle_path


register_oracle("openai", OpenAICloudConfig, "collab_env.cloud.openai_compat:OpenAIOracle")
register_oracle("transformers", TransformersCloudConfig, "collab_env.cloud.hf_local:TransformersOracle")
register_oracle("vllm", VLLMCloudConfig, "collab_env.cloud.vllm_engine:VLLMOracle")


def cloud_config(value: Any) -> CloudConfig:
    """A cloud config from a name, dict, OmegaConf node or config instance.

    An instance's `name` must be the oracle its class was registered for: Hydra builds the class from
    the `cloud` group option, so an override such as `cloud.name=nope` reaches here as a
    SimulatedCloudConfig named "nope"."""
    config = coerce(CloudConfig, value, "cloud", registry=CLOUD_CONFIGS)
    if config.name not in CLOUD_CONFIGS:
        raise unknown_name("cloud", config.name, CLOUD_CONFIGS, field="cloud.name")
    if CLOUD_CONFIGS[config.name] is not type(config):
        raise ConfigError(
            f"cloud.name={config.name!r} does not match the settings of the chosen oracle "
            f"({type(config).__name__}); pick the oracle with the cloud group instead (cloud={config.name})."
        )
    return config


def _oracle_class(name: str) -> type[CloudOracle]:
    module_name, class_name = _ORACLES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def check_cloud(config: Any) -> CloudConfig:
    """The cloud config, after the checks its oracle makes first (API key variable, model directory),
    made without building the oracle: no HTTP client, no model weights, no engine."""
    config = cloud_config(config)
    _oracle_class(config.name).check_config(config)
    return config


def make_oracle(config: Any, task: Task) -> CachedOracle:
    """The oracle named by `config.name`, wrapped in the answer cache at `config.cache_path`."""
    config = cloud_config(config)
    oracle_class = _oracle_class(config.name)
    path = config.cache_path or str(cache_dir() / "cloud-answers.sqlite")
    return CachedOracle(oracle_class(config, task), AnswerCache(path))


__all__ = [
    "CLOUD_CONFIGS",
    "AnswerCache",
    "CachedOracle",
    "CloudAnswer",
    "CloudOracle",
    "CloudStats",
    "check_cloud",
    "cloud_config",
    "make_oracle",
    "register_oracle",
]
