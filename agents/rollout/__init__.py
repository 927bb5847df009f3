"""Rollout backends: prompts x G -> scored completions with sampling log-probabilities."""

from __future__ import annotations

from typing import Any

from agents.config import RolloutConfig
from agents.policy import Policy
from agents.rollout.base import RolloutEngine
from agents.rollout.env_stepping import EnvRollout
from agents.rollout.hf import HFRollout
from agents.rollout.vllm import VLLMRollout

BACKENDS: dict[str, type[RolloutEngine]] = {"hf": HFRollout, "env": EnvRollout, "vllm": VLLMRollout}
"""`rollout.backend` -> engine class (RolloutConfig checks the name)."""


def make_rollout(policy: Policy, env: Any, config: RolloutConfig, seed: int = 0) -> RolloutEngine:
    """The backend named by `config.backend` (hf, vllm or env)."""
    return BACKENDS[config.backend](policy, env, config, seed)
