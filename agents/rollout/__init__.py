"""Rollout backends: prompts x G -> scored completions with sampling log-probabilities."""

from __future__ import annotations

from typing import Any

from agents.config import RolloutConfig
from agents.policy import Policy
from agents.rollout.base import GeneratingRollout, Generation, Rollout, RolloutEngine, pad_batch


def make_rollout(policy: Policy, env: Any, config: RolloutConfig, seed: int = 0) -> RolloutEngine:
    """The backend named by `config.backend` (hf, vllm or env)."""
    if config.backend == "hf":
        from agents.rollout.hf import HFRollout

        return HFRollout(policy, env, config, seed)
    if config.backend == "env":
        from agents.rollout.env_stepping import EnvRollout

        return EnvRollout(policy, env, config, seed)
    from agents.rollout.vllm import VLLMRollout

    return VLLMRollout(policy, env, config, seed)


__all__ = ["Generation", "GeneratingRollout", "Rollout", "RolloutEngine", "make_rollout", "pad_batch"]
