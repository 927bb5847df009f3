"""A Lagrangian group baseline in the spirit of DA-GRPO (arXiv 2602.00166, the paper's group's
follow-up). Not a reproduction: only the abstract and a secondary description of the method were
available (shared/research-notes.md section 2); every choice that description leaves open is a
field of `DAGRPOConfig`.

Per prompt x with G samples, correctness r_i and cloud use c_i in {0, 1}, a "dual advantage" puts
the cloud constraint into the advantage instead of into a fixed reward shaping:

    A_i = (r_i - mean(r)) - lambda * (c_i - mean(c))                                 (no std scaling)
    L   = -1/|P| sum_{x in P} 1/(G-1) sum_i A_i sum_t log pi(y_i,t | x)    (on-policy, every prompt P)

and once per step, after the update direction is computed with the current lambda, dual ascent on
the constraint "cloud rate <= tau":

    lambda <- max(0, lambda + eta * (cloud rate of the batch - tau))

r_i is the final answer's correctness (`correctness="any"`: right on the device or from the cloud)
or the env's hierarchical reward; c_i is an admitted cloud call (or any call for help); tau
defaults to the budget's share rho/(1+rho). Like GAPG: no ratio clipping, no KL, log pi summed
over the device's own tokens, one update per batch. lambda is the algorithm's state: saved in
every checkpoint's state.json and restored on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from agents.algorithm import Algorithm
from agents.batch import Rollout
from agents.config import AgentConfig
from agents.policy import Policy, PolicyOutput
from collab_env.config import check_choice
from collab_env.errors import ConfigError

CORRECTNESS = ("any", "hierarchical")
CLOUD_USE = ("admitted", "called")
RATE_UNITS = ("sample", "prompt")


@dataclass
class DAGRPOConfig(AgentConfig):
    """Settings of the Lagrangian baseline; the open points of its secondary description are fields."""

    name: str = "da_grpo"
    correctness: str = "any"
    """r_i. any: 1 when the final answer is right, from the device or from the cloud (the env's
    `correct`), else 0; the cost of a call is then lambda alone. hierarchical: the env's hierarchical
    reward (v3 eq. 18), which already discounts a cloud answer (alpha_c) on top of lambda."""
    cloud_use: str = "admitted"
    """c_i. admitted: the sample called for help and the budget admitted the call (the env's
    `called_cloud`); called: it called for help, admitted or not (`called_help`). The two differ only
    when training runs under a cap (budget.mode=cap)."""
    lambda_0: float = 0.5
    """Initial Lagrange multiplier (the description's value)."""
    eta: float = 1e-2
    """Step size of the dual ascent on lambda (not the policy's learning rate, train.lr)."""
    tau: float | None = None
    """Target cloud rate of the constraint; null: the budget's share rho/(1+rho) (0.3 at rho=3/7)."""
    rate_unit: str = "sample"
    """How the batch cloud rate of the dual step is counted. sample: the share of all sampled
    sequences with c_i = 1. prompt: the share of prompts on which more than half of the G samples
    have c_i = 1, a proxy for the greedy decision that the test-time cap counts per question (the
    mean of per-prompt rates would equal the per-sample rate, as every prompt has G samples)."""

    def __post_init__(self) -> None:
        check_choice("agent.correctness", self.correctness, CORRECTNESS)
        check_choice("agent.cloud_use", self.cloud_use, CLOUD_USE)
        check_choice("agent.rate_unit", self.rate_unit, RATE_UNITS)
        if self.lambda_0 < 0:
            raise ConfigError(f"agent.lambda_0={self.lambda_0} must be >= 0 (a Lagrange multiplier).")
        if self.eta < 0:
            raise ConfigError(f"agent.eta={self.eta} must be >= 0 (0 keeps lambda fixed at lambda_0).")
        if self.tau is not None and not 0 <= self.tau <= 1:
            raise ConfigError(
                f"agent.tau={self.tau} must be a cloud rate between 0 and 1, or null for the budget's share."
            )
        if self.epochs != 1 or self.minibatches != 1:
            raise ConfigError(
                "da_grpo is on-policy without importance ratios: agent.epochs and agent.minibatches must "
                "be 1. Use agent=grpo for several epochs or minibatches per batch."
            )


def dual_advantages(correct: torch.Tensor, cloud: torch.Tensor, lam: float) -> torch.Tensor:
    """(prompts, G) -> A_i = (r_i - mean r) - lambda * (c_i - mean c), the group-centred dual advantage."""
    return (correct - correct.mean(-1, keepdim=True)) - lam * (cloud - cloud.mean(-1, keepdim=True))


def batch_cloud_rate(cloud: torch.Tensor, rate_unit: str) -> float:
    """The cloud rate of a (prompts, G) 0/1 matrix, per sample or per prompt (its majority)."""
    if rate_unit == "prompt":
        return float((cloud.mean(-1) > 0.5).float().mean())
    return float(cloud.mean())


def dual_step(lam: float, rate: float, tau: float, eta: float) -> float:
    """Projected dual ascent: lambda rises while the cloud rate exceeds tau, falls otherwise, never below 0."""
    return max(0.0, lam + eta * (rate - tau))


def da_grpo_loss(logprobs: torch.Tensor, advantages: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """-(1/|P|) sum_x 1/(G-1) sum_i A_i sum_t log pi(y_i,t): coef holds 1/(|P| (G-1)) on completion tokens."""
    return -(coef * advantages * logprobs).sum()


class DAGRPO(Algorithm):
    only_advantage_terms = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lam = float(self.config.lambda_0)

    @property
    def tau(self) -> float:
        return self.budget.share if self.config.tau is None else self.config.tau

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = float(state.get("lambda", self.config.lambda_0))

    def prepare(
        self, rollout: Rollout, step: int, policy: Policy, reference: Policy | None
    ) -> tuple[Rollout | None, dict[str, float]]:
        config: DAGRPOConfig = self.config
        shape = (rollout.num_prompts, rollout.group_size)
        if config.correctness == "any":
            correct = rollout.flag("correct").float()
        else:
            correct = rollout.rewards.view(shape)
        cloud = rollout.flag("called_cloud" if config.cloud_use == "admitted" else "called_help").float()
        advantages = dual_advantages(correct, cloud, self.lam).flatten()
        rate = batch_cloud_rate(cloud, config.rate_unit)
        metrics = {
            "dagrpo/lambda": self.lam,
            "dagrpo/cloud_rate": rate,
            "dagrpo/tau": self.tau,
            "adv/abs_mean": float(advantages.abs().mean()),
        }
        self.lam = dual_step(self.lam, rate, self.tau, config.eta)  # the next step's multiplier
        mask = rollout.completion_mask
        rollout.extras["advantages"] = advantages[:, None] * mask
        rollout.extras["coef"] = mask / (rollout.num_prompts * (rollout.group_size - 1))
        return rollout, metrics

    def loss(self, out: PolicyOutput, batch: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        loss = da_grpo_loss(out.logprobs, batch.extras["advantages"], batch.extras["coef"])
        return loss, {"loss/policy": loss.item()}
