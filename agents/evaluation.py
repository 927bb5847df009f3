"""Held-out evaluation: greedy decoding under the test-time cloud cap, and the paper's metrics.

The cap follows the paper's protocol (paper-spec section 5.5): over N held-out prompts at most
floor(rho/(1+rho) * N) calls reach the cloud, first come first served in prompt order; a refused
call is answered by the device (scored on its local answer).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym

from agents.config import RolloutConfig, RunConfig
from agents.policy import Policy
from collab_env.config import BudgetConfig


@dataclass
class EvalResult:
    """Per-prompt final infos of one evaluation, and the metrics computed from them."""

    infos: list[dict[str, Any]]
    rewards: list[float] = field(default_factory=list)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in summarize(self.infos).items()}


def summarize(infos: list[dict[str, Any]]) -> dict[str, float]:
    """accuracy, cloud_rate (after the cap), help_rate (before it), local accuracy, tokens per answer, per level."""
    n = max(len(infos), 1)
    local = [i for i in infos if not i["called_cloud"]]
    out = {
        "accuracy": sum(i["correct"] for i in infos) / n,
        "cloud_rate": sum(i["called_cloud"] for i in infos) / n,
        "help_rate": sum(i["called_help"] for i in infos) / n,
        "local_accuracy": sum(i["local_correct"] for i in infos) / n,
        "conditional_local_accuracy": sum(i["local_correct"] for i in local) / max(len(local), 1),
        "tokens_per_answer": sum(i["completion_tokens"] for i in infos) / n,
    }
    by_level: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for info in infos:
        by_level[info["level"]].append(info)
    if len(by_level) > 1:
        for level, items in by_level.items():
            out[f"accuracy/{level}"] = sum(i["correct"] for i in items) / len(items)
            out[f"help_rate/{level}"] = sum(i["called_help"] for i in items) / len(items)
            out[f"local_accuracy/{level}"] = sum(i["local_correct"] for i in items) / len(items)
    return out


def make_eval_env(run: RunConfig, num_prompts: int | None = None, split: str = "test") -> gym.Env:
    """The run's env on held-out prompts with the cap over a window of `num_prompts` episodes."""
    from agents.trainer import make_train_env

    window = num_prompts or run.train.eval_prompts
    budget = BudgetConfig(mode="cap", ratio=run.budget.ratio, window=window)
    return make_train_env(run, budget=budget, split=split)


def evaluate_policy(
    policy: Policy, env: gym.Env, prompt_ids: list[int], rollout: RolloutConfig, max_batch: int
) -> EvalResult:
    """Greedy completions for `prompt_ids`, scored in order under the env's budget (a fresh window)."""
    from agents.rollout import make_rollout

    unwrapped = env.unwrapped
    unwrapped.budget.reset_window()
    config = RolloutConfig(backend="hf" if rollout.backend == "env" else rollout.backend, max_batch=max_batch)
    engine = make_rollout(policy, env, config)
    was_training = policy.training
    result = engine.rollout(prompt_ids, group_size=1, greedy=True)
    policy.train(was_training)
    return EvalResult(result.infos, result.rewards.tolist())
