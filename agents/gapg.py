"""GAPG, the group-adaptive policy gradient (paper-spec section 4; v3 section 3.3, Algorithm 1).

Per prompt x with G samples and rewards r_1..r_G (hierarchical reward, v3 eq. 18):

    grad R(x) = 1/(G-1) * sum_i grad log pi(y_i^theta | x) * (r_i - mean(r))        (v3 eq. 2)

an unbiased estimator (Prop. 3.1) with no std scaling, no ratio clipping, no KL and no length
normalisation: log pi is summed over the device's own tokens. Only prompts kept by the adaptive
filter (Alg. 1 lines 11-12) are learned from, averaged per prompt (v3 eq. 5):

    Set 1 = prompts with at least one locally correct sample,
    Set 2 = up to floor(rho * |Set 1|) prompts with no locally correct sample but a correct cloud answer,
    theta <- theta + eta / |Set 1 u Set 2| * sum_{x in Set 1 u Set 2} grad R(x).

Skill keeping (issue 17, not the paper's estimator, off by default): `kl_anchor` > 0 adds
kl_anchor * KL(pi(.|x) || pi_0(.|x)) to the loss of each kept prompt, the sequence-level KL to the
frozen starting model pi_0, estimated by the k3 estimate summed over a sample's tokens and averaged
over its G samples, so that the device's own answers do not drift away while it learns to call.
With `kl_anchor_scope=content` the anchor covers only the content part of log pi below.

Decoupled help decision (issue 17, in the spirit of Thinkless's DeGRPO; off by default): where the
marker could start, log pi(y_t) = d_t + c_t exactly, the decision d_t (log p_help where the sample
called, log(1 - p_help) where it did not) plus the content c_t (log pi(y_t | not calling);
agents.policy.HelpChoices). `help_weight` w replaces sum_t log pi by sum_t (w d_t + c_t) in v3 eq. 2,
so the call-or-not choice learns at its own rate; w = 1 is the paper's estimator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from agents.algorithm import Algorithm, score_batch
from agents.batch import Rollout
from agents.config import AgentConfig
from agents.grpo import kl_k3
from agents.policy import Policy, PolicyOutput
from collab_env.config import check_choice
from collab_env.errors import ConfigError

SET1_RULES = ("any_local_correct", "mixed")
SET2_ORDERS = ("random", "first")
KL_ANCHOR_SCOPES = ("all", "content")


@dataclass
class GAPGConfig(AgentConfig):
    """Settings of GAPG; the paper's open questions (paper-spec section 11) are fields here."""

    name: str = "gapg"
    set1_rule: str = "any_local_correct"
    """Set 1: any_local_correct (the text of v3 section 3.3.2: at least one sample correct on the
    device) or mixed (Alg. 1 line 11: both locally correct and other samples; all-correct groups,
    which have zero advantage anyway, then leave the per-prompt average)."""
    set2_order: str = "random"
    """Which Set 2 candidates fill the quota when there are more than rho*|Set 1|: random or first."""
    filter_ratio: float | None = None
    """rho of the filter; null uses budget.ratio (the paper: "the filtering ratio inherits from the constraint")."""
    filtering: bool = True
    """False learns from every prompt (the filtering-off ablation, v3 App. A.1.3)."""
    scale_by_std: bool = False
    """Divide each group's weights by its reward std, as GRPO does. Not the paper's GAPG (off by
    default): a variant for small devices, where a useful call on an unsolved prompt otherwise earns
    far less than a call on a solved prompt loses (docs/gapg_vs_grpo.md)."""
    kl_anchor: float = 0.0
    """Skill keeping (issue 17): weight of the k3 KL estimate to the frozen starting model, per kept
    prompt the sequence-level KL (summed over tokens, averaged over the G samples), so that local
    accuracy does not fall during RL. 0 (the default) is the paper's GAPG and keeps no reference model."""
    kl_anchor_scope: str = "all"
    """What kl_anchor holds near the starting model: all (every token's whole distribution, help
    decision included) or content (each token's distribution given not calling: the device's steps
    and answers are anchored, where it calls is free to move)."""
    help_weight: float = 1.0
    """Weight of the help decision's part of log pi in the policy gradient (the decoupled decision in
    the module docstring): above 1 the call-or-not choice learns faster than the content, 0 freezes it.
    1 (the default) is the paper's GAPG."""

    def __post_init__(self) -> None:
        check_choice("agent.set1_rule", self.set1_rule, SET1_RULES)
        check_choice("agent.set2_order", self.set2_order, SET2_ORDERS)
        check_choice("agent.kl_anchor_scope", self.kl_anchor_scope, KL_ANCHOR_SCOPES)
        if self.kl_anchor < 0:
            raise ConfigError(
                f"agent.kl_anchor={self.kl_anchor} must be >= 0 (0: no KL anchor, the paper's GAPG)."
            )
        if self.help_weight < 0:
            raise ConfigError(
                f"agent.help_weight={self.help_weight} must be >= 0 (1: the paper's GAPG, no decoupling)."
            )
        if self.filter_ratio is not None and not 0 <= self.filter_ratio <= 1:
            raise ConfigError(f"agent.filter_ratio={self.filter_ratio} must be between 0 and 1 (or null).")
        if self.epochs != 1 or self.minibatches != 1:
            raise ConfigError(
                "GAPG is on-policy without importance ratios (v3 eq. 5): agent.epochs and agent.minibatches "
                "must be 1. Use agent=grpo for several epochs or minibatches per batch."
            )


def gapg_weights(rewards: torch.Tensor, scale_by_std: bool = False) -> torch.Tensor:
    """(prompts, G) -> (r_i - mean_j r_j) / (G - 1): the per-sample weight of grad log pi in v3 eq. 2;
    with `scale_by_std`, further divided by the group's reward std (+1e-4)."""
    group_size = rewards.shape[-1]
    weights = (rewards - rewards.mean(dim=-1, keepdim=True)) / (group_size - 1)
    return weights / (rewards.std(dim=-1, keepdim=True) + 1e-4) if scale_by_std else weights


def select_prompts(
    local_correct: torch.Tensor,
    cloud_correct: torch.Tensor,
    rho: float,
    set1_rule: str,
    set2_order: str,
    rng: np.random.Generator,
) -> tuple[list[int], list[int], int]:
    """Adaptive prompt filtering (Alg. 1 lines 11-12) on (prompts, G) boolean matrices.

    Returns Set 1, Set 2 (prompt indices) and the number of Set 2 candidates.
    """
    has_local = local_correct.any(dim=1)
    if set1_rule == "mixed":
        has_local = has_local & ~local_correct.all(dim=1)
    set1 = has_local.nonzero().flatten().tolist()
    candidates = (~local_correct.any(dim=1) & cloud_correct.any(dim=1)).nonzero().flatten().tolist()
    quota = math.floor(rho * len(set1) + 1e-9)
    if set2_order == "random":
        candidates_in_order = [candidates[i] for i in rng.permutation(len(candidates))]
    else:
        candidates_in_order = candidates
    return set1, sorted(candidates_in_order[:quota]), len(candidates)


def gapg_loss(logprobs: torch.Tensor, weights: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """-(1/|S|) sum_x sum_i w_i sum_t log pi(y_i,t): minus the v3 eq. 5 ascent direction (coef holds 1/|S|)."""
    return -(coef * weights * logprobs).sum()


class GAPG(Algorithm):
    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return self.config.kl_anchor > 0

    @property
    def only_advantage_terms(self) -> bool:  # type: ignore[override]
        return not self.needs_reference

    @property
    def needs_decision(self) -> bool:  # type: ignore[override]
        config: GAPGConfig = self.config
        return config.help_weight != 1 or (self.needs_reference and config.kl_anchor_scope == "content")

    def prepare(
        self, rollout: Rollout, step: int, policy: Policy, reference: Policy | None
    ) -> tuple[Rollout | None, dict[str, float]]:
        config: GAPGConfig = self.config
        rewards = rollout.rewards.view(rollout.num_prompts, rollout.group_size)
        if config.filtering:
            rho = self.budget.ratio if config.filter_ratio is None else config.filter_ratio
            rng = np.random.default_rng([self.seed, step])
            set1, set2, candidates = select_prompts(
                rollout.flag("local_correct"),
                rollout.flag("cloud_correct"),
                rho,
                config.set1_rule,
                config.set2_order,
                rng,
            )
        else:
            set1, set2, candidates = list(range(rollout.num_prompts)), [], 0
        metrics = {
            "gapg/set1": float(len(set1)),
            "gapg/set2": float(len(set2)),
            "gapg/set2_candidates": float(candidates),
        }
        chosen = sorted(set1 + set2)
        if not chosen:
            return None, metrics
        weights = gapg_weights(rewards, config.scale_by_std)[chosen].flatten()
        rows = torch.cat([torch.arange(p * rollout.group_size, (p + 1) * rollout.group_size) for p in chosen])
        batch = rollout.select(rows)
        batch.extras["advantages"] = weights[:, None] * batch.completion_mask
        batch.extras["coef"] = batch.completion_mask / len(chosen)
        if reference is not None:
            scored = score_batch(
                reference, batch, self.train.micro_batch_size, help_choices=self.decision_choices
            )
            batch.extras["ref_logprobs"] = self._anchored(scored)
        metrics["adv/abs_mean"] = float(weights.abs().mean())
        return batch, metrics

    def _anchored(self, out: PolicyOutput) -> torch.Tensor:
        """The part of log pi the KL anchor holds: all of it, or the content (log pi minus the decision)."""
        if self.config.kl_anchor_scope == "content":
            return out.logprobs - out.decision_logprobs
        return out.logprobs

    def loss(self, out: PolicyOutput, batch: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        config: GAPGConfig = self.config
        coef = batch.extras["coef"]
        logprobs = out.logprobs
        if config.help_weight != 1:
            logprobs = logprobs + (config.help_weight - 1) * out.decision_logprobs
        loss = gapg_loss(logprobs, batch.extras["advantages"], coef)
        metrics = {"loss/policy": loss.item()}
        if "ref_logprobs" in batch.extras:
            # coef holds 1/|S|; over G it averages the samples' summed-token KL estimates per prompt.
            kl = (coef * kl_k3(self._anchored(out), batch.extras["ref_logprobs"])).sum() / batch.group_size
            loss = loss + config.kl_anchor * kl
            metrics["loss/kl"] = kl.item()
        return loss, metrics
