"""Held-out evaluation of a policy: greedy completions scored in prompt order under the env's budget.

Under the test-time cap (agents.runs.held_out_cap, the paper's protocol of paper-spec section 5.5) at most
floor(rho/(1+rho) * N) of N held-out prompts reach the cloud, first come first served; a refused call
is answered by the device (scored on its local answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym

from agents.config import RolloutConfig
from agents.metrics import summarize
from agents.policy import Policy
from agents.rollout import make_rollout


@dataclass
class EvalResult:
    """Per-prompt final infos of one evaluation, and the metrics computed from them."""

    infos: list[dict[str, Any]]
    rewards: list[float] = field(default_factory=list)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in summarize(self.infos).items()}


def evaluate_policy(
    policy: Policy, env: gym.Env, prompt_ids: list[int], rollout: RolloutConfig, max_batch: int
) -> EvalResult:
    """Greedy completions for `prompt_ids`, scored in order under the env's budget (a fresh window)."""
    unwrapped = env.unwrapped
    unwrapped.budget.reset_window()
    config = RolloutConfig(backend="hf" if rollout.backend == "env" else rollout.backend, max_batch=max_batch)
    engine = make_rollout(policy, env, config)
    was_training = policy.training
    result = engine.rollout(prompt_ids, group_size=1, greedy=True)
    policy.train(was_training)
    return EvalResult(result.infos, result.rewards.tolist())
