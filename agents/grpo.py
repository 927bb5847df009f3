"""GRPO (Shao et al. 2024) and Dr. GRPO (Liu et al. 2025), on every prompt, without filtering.

With the hierarchical reward this is the paper's "Collaboration-Aware Tuning" baseline and its
failure mode (paper-spec section 8.1): std normalisation makes a lone cloud-assisted success worth
as much as a lone local one, and calling for help is easy to learn.

    A_i = (r_i - mean(r)) / (std(r) + eps)                    GRPO (v3 App. C.1 eq. 16)
    A_i =  r_i - mean(r)                                      Dr. GRPO
    L   = -sum_{i,t} c_{i,t} min(rho_{i,t} A_i, clip(rho_{i,t}, 1-eps_lo, 1+eps_hi) A_i) + beta * sum c KL_k3
    c_{i,t} = 1 / (N |y_i|)  (grpo: mean over tokens, then sequences)   or   1 / (N L_max)  (dr_grpo)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agents.algorithm import Algorithm, score_batch
from agents.batch import Rollout
from agents.config import AgentConfig
from agents.policy import Policy, PolicyOutput
from collab_env.config import check_choice
from collab_env.errors import ConfigError

LOSS_TYPES = ("grpo", "dr_grpo")


@dataclass
class GRPOConfig(AgentConfig):
    name: str = "grpo"
    loss_type: str = "grpo"
    """grpo: std-normalised advantages, per-sequence length normalisation; dr_grpo: neither."""
    clip_epsilon: float = 0.2
    """Lower clip range of the importance ratio."""
    clip_epsilon_high: float | None = None
    """Upper clip range (null: same as clip_epsilon)."""
    beta: float = 0.0
    """Weight of the k3 KL estimate to the frozen starting model (0: no reference model is kept)."""
    std_epsilon: float = 1e-4
    """Added to the group std before dividing (grpo only)."""

    def __post_init__(self) -> None:
        check_choice("agent.loss_type", self.loss_type, LOSS_TYPES)
        if self.clip_epsilon <= 0 or (self.clip_epsilon_high is not None and self.clip_epsilon_high <= 0):
            raise ConfigError("agent.clip_epsilon (and clip_epsilon_high) must be positive.")
        if self.beta < 0 or self.std_epsilon <= 0:
            raise ConfigError("agent.beta must be >= 0 and agent.std_epsilon > 0.")
        if self.epochs < 1 or self.minibatches < 1:
            raise ConfigError("agent.epochs and agent.minibatches must be at least 1.")


def grpo_advantages(rewards: torch.Tensor, scale_by_std: bool, std_epsilon: float) -> torch.Tensor:
    """(prompts, G) group-relative advantages: centred by the group mean, optionally divided by its std."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    return centred / (rewards.std(dim=-1, keepdim=True) + std_epsilon) if scale_by_std else centred


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate min(rho A, clip(rho) A) and whether the clip was active."""
    ratio = torch.exp(logprobs - old_logprobs)
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    surrogate = torch.minimum(ratio * advantages, clipped_ratio * advantages)
    return surrogate, (ratio * advantages > clipped_ratio * advantages).float()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi || ref) per token: exp(ref - lp) - (ref - lp) - 1 >= 0."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


@dataclass
class DrGRPOConfig(GRPOConfig):
    """Dr. GRPO defaults (`agent=dr_grpo`): the v3 paper's Collaboration-Aware Tuning optimizer."""

    name: str = "dr_grpo"
    loss_type: str = "dr_grpo"


class GRPO(Algorithm):
    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return self.config.beta > 0

    @property
    def only_advantage_terms(self) -> bool:  # type: ignore[override]
        return not self.needs_reference

    def prepare(
        self, rollout: Rollout, step: int, policy: Policy, reference: Policy | None
    ) -> tuple[Rollout | None, dict[str, float]]:
        config: GRPOConfig = self.config
        rewards = rollout.rewards.view(rollout.num_prompts, rollout.group_size)
        advantages = grpo_advantages(rewards, config.loss_type == "grpo", config.std_epsilon).flatten()
        mask = rollout.completion_mask
        n = len(rollout.prompt_ids)
        if config.loss_type == "grpo":
            coef = mask / (n * mask.sum(dim=1, keepdim=True).clamp(min=1))
        else:
            coef = mask / (n * self.max_new_tokens)  # L_max = env.max_new_tokens
        rollout.extras["advantages"] = advantages[:, None] * mask
        rollout.extras["coef"] = coef
        if reference is not None:
            rollout.extras["ref_logprobs"] = score_batch(
                reference, rollout, self.train.micro_batch_size
            ).logprobs
        return rollout, {"adv/abs_mean": float(advantages.abs().mean())}

    def loss(self, out: PolicyOutput, batch: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        config: GRPOConfig = self.config
        high = config.clip_epsilon if config.clip_epsilon_high is None else config.clip_epsilon_high
        coef = batch.extras["coef"]
        surrogate, clipped = clipped_surrogate(
            out.logprobs, batch.old_logprobs, batch.extras["advantages"], config.clip_epsilon, high
        )
        loss = -(coef * surrogate).sum()
        metrics = {"loss/policy": loss.item(), "loss/clip_fraction": (coef * clipped).sum().item()}
        if "ref_logprobs" in batch.extras:
            kl = (coef * kl_k3(out.logprobs, batch.extras["ref_logprobs"])).sum()
            loss = loss + config.beta * kl
            metrics["loss/kl"] = kl.item()
        return loss, metrics
