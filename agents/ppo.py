"""Token-level PPO (Schulman et al. 2017) with a value head and GAE, on the same rollouts.

Each completion token is an action; the only reward is the hierarchical reward on the last token.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = sum_k (gamma lambda)^k delta_{t+k}     (GAE)
    L = -mean_t min(rho_t A_t, clip(rho_t) A_t) + vf_coef * mean_t 0.5 (V(s_t) - R_t)^2 - ent_coef * mean_t H_t
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agents.algorithm import Algorithm, score_batch
from agents.batch import Rollout
from agents.config import AgentConfig
from agents.grpo import clipped_surrogate
from agents.policy import Policy, PolicyOutput
from collab_env.errors import ConfigError


@dataclass
class PPOConfig(AgentConfig):
    name: str = "ppo"
    epochs: int = 2
    minibatches: int = 2
    clip_epsilon: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    """Entropy bonus; over a 49k-token vocabulary small values matter."""
    gamma: float = 1.0
    gae_lambda: float = 0.95
    whiten_advantages: bool = True
    """Normalise advantages over the batch's tokens (mean 0, std 1)."""

    def __post_init__(self) -> None:
        if not 0 < self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ConfigError("agent.gamma must be in (0, 1] and agent.gae_lambda in [0, 1].")
        if self.clip_epsilon <= 0 or self.vf_coef < 0 or self.ent_coef < 0:
            raise ConfigError(
                "agent.clip_epsilon must be positive; vf_coef and ent_coef must not be negative."
            )
        if self.epochs < 1 or self.minibatches < 1:
            raise ConfigError("agent.epochs and agent.minibatches must be at least 1.")


def terminal_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) sequence rewards -> (N, Lc) per-token rewards, all on each sequence's last token."""
    per_token = torch.zeros_like(mask)
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    per_token[torch.arange(len(rewards)), last] = rewards
    return per_token * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (N, Lc) right-padded sequences; returns (advantages, returns)."""
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(values.shape[0], dtype=values.dtype)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(values.shape[1])):
        live = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * live
        advantages[:, t] = advantage
        next_value = values[:, t] * live
        next_advantage = advantage
    return advantages, (advantages + values) * mask


class PPO(Algorithm):
    needs_values = True
    needs_entropy = True

    def prepare(
        self, rollout: Rollout, step: int, policy: Policy, reference: Policy | None
    ) -> tuple[Rollout | None, dict[str, float]]:
        config: PPOConfig = self.config
        mask = rollout.completion_mask
        values = score_batch(policy, rollout, self.train.micro_batch_size, with_values=True).values * mask
        advantages, returns = gae(
            terminal_rewards(rollout.rewards, mask), values, mask, config.gamma, config.gae_lambda
        )
        if config.whiten_advantages:
            live = mask.bool()
            mean, std = advantages[live].mean(), advantages[live].std()
            advantages = (advantages - mean) / (std + 1e-8) * mask
        rollout.extras.update(advantages=advantages, returns=returns, coef=mask / mask.sum().clamp(min=1))
        return rollout, {"ppo/value_mean": float(values.sum() / mask.sum().clamp(min=1))}

    def loss(self, out: PolicyOutput, batch: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        config: PPOConfig = self.config
        coef = batch.extras["coef"]
        surrogate, clipped = clipped_surrogate(
            out.logprobs,
            batch.old_logprobs,
            batch.extras["advantages"],
            config.clip_epsilon,
            config.clip_epsilon,
        )
        policy_loss = -(coef * surrogate).sum()
        value_loss = (coef * 0.5 * (out.values - batch.extras["returns"]) ** 2).sum()
        entropy = (coef * out.entropy).sum()
        loss = policy_loss + config.vf_coef * value_loss - config.ent_coef * entropy
        return loss, {
            "loss/policy": policy_loss.item(),
            "loss/value": value_loss.item(),
            "loss/entropy": entropy.item(),
            "loss/clip_fraction": (coef * clipped).sum().item(),
        }
