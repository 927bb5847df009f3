"""Held-out evaluation of a policy: greedy completions scored in prompt order under the env's budget.

Under the test-time cap (agents.runs.held_out_cap, the paper's protocol of paper-spec section 5.5) at
most floor(rho/(1+rho) * N) of N held-out prompts reach the cloud, first come first served.

The cap rule, the same for every method: a call the cap refuses is answered by the device on its own.
A router then keeps the device's answer; a policy that asked in its completion answers again, greedily,
with the help action banned (`help_bias=-inf`), and that answer is scored. Given `local_env` (an env
whose budget admits no call), `evaluate_policy` applies the rule and also keeps what the policy answers
on its own for every prompt, and how near each completion came to calling (`help_margins`): together
they give the policy's accuracy-vs-cloud-rate curve (`help_curve`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import torch

from agents.batch import Rollout
from agents.config import RolloutConfig
from agents.metrics import summarize
from agents.policy import Policy
from agents.rollout import make_rollout
from agents.rollout.hf import HFRollout
from agents.tradeoff import threshold_curve

MARGIN_BATCH = 16
"""Rows per forward when measuring help margins (each keeps vocabulary-wide logits at its branch positions)."""


@dataclass
class EvalResult:
    """Per-prompt final infos of one evaluation (each with its greedy `completion` text and its
    `min_token_prob`, see `with_completions`), and the metrics computed from them."""

    infos: list[dict[str, Any]]
    rewards: list[float] = field(default_factory=list)
    alone: list[dict[str, Any]] = field(default_factory=list)
    """With `local_env`: the info of what the policy answers without calling, per prompt (its greedy
    completion where that did not call, its help-banned one where it did)."""
    margins: list[float] = field(default_factory=list)
    """With `local_env`: each prompt's help margin (`Policy.help_margins`) along the completion that
    decides it: the greedy one, and for a caller also the help-banned one (the larger counts)."""

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in summarize(self.infos).items()}


def evaluate_policy(
    policy: Policy,
    env: gym.Env,
    prompt_ids: list[int],
    rollout: RolloutConfig,
    max_batch: int,
    local_env: gym.Env | None = None,
    help_bias: float = 0.0,
) -> EvalResult:
    """Greedy completions for `prompt_ids`, scored in order under the env's budget (a fresh window);
    with `local_env`, refused calls are answered by the device (the cap rule above). `help_bias` is
    added to the help action's logit (a budget-calibrated policy, agents.baselines.context)."""
    env.unwrapped.budget.reset_window()
    config = RolloutConfig(backend="hf" if rollout.backend == "env" else rollout.backend, max_batch=max_batch)
    engine = make_rollout(policy, env, config)
    was_training = policy.training
    try:
        greedy = engine.rollout(prompt_ids, group_size=1, greedy=True, help_bias=help_bias)
        greedy.infos = with_completions(greedy, env.unwrapped.tokenizer)
        if local_env is None:
            return EvalResult(greedy.infos, greedy.rewards.tolist())
        local = HFRollout(policy, local_env, config)
        branches = local.help_branches()
        margins = help_margins(policy, greedy, branches)
        alone, infos = list(greedy.infos), list(greedy.infos)
        callers = [i for i, info in enumerate(greedy.infos) if info["called_help"]]
        if callers:
            local_env.unwrapped.budget.reset_window()
            banned = local.rollout([prompt_ids[i] for i in callers], 1, greedy=True, help_bias=-math.inf)
            banned.infos = with_completions(banned, local_env.unwrapped.tokenizer)
            for k, (i, margin) in enumerate(
                zip(callers, help_margins(policy, banned, branches), strict=True)
            ):
                alone[i] = banned.infos[k]
                margins[i] = max(margins[i], margin)
                if infos[i]["outcome"] == "over_budget":
                    infos[i] = answered_alone(infos[i], banned.infos[k])
        return EvalResult(infos, greedy.rewards.tolist(), alone, margins)
    finally:
        policy.train(was_training)


def with_completions(batch: Rollout, tokenizer: Any) -> list[dict[str, Any]]:
    """The batch's infos, each with its completion's text (`completion`, decoded as the env's scorer
    reads it), where agents.call_position finds how far a completion got before it called, and
    `min_token_prob`: the lowest probability of a token of the completion (the stop token included;
    1.0 for an empty one) under the distribution it was decoded from (the batch's `old_logprobs`: for
    a greedy one, the model's softmax at temperature 1), the confidence router's signal."""
    tail = batch.input_ids[:, -batch.completion_len :]
    rows = zip(batch.infos, tail, batch.completion_mask.bool(), batch.old_logprobs, strict=True)
    return [
        {
            **info,
            "completion": tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True),
            "min_token_prob": math.exp(min(logprobs[mask].tolist(), default=0.0)),
        }
        for info, ids, mask, logprobs in rows
    ]


def answered_alone(refused: dict[str, Any], alone: dict[str, Any]) -> dict[str, Any]:
    """The final info of a refused call once the device has answered on its own: still a refused call
    (`over_budget`, it asked), scored on the device's own answer, whose `min_token_prob` it takes
    (that of the help-banned completion: the help token's mass left out where it was banned); its
    `completion` stays the one that called."""
    return {
        **refused,
        "local_answer": alone["local_answer"],
        "local_correct": alone["local_correct"],
        "correct": alone["local_correct"],
        "min_token_prob": alone["min_token_prob"],
        "completion_tokens": refused["completion_tokens"] + alone["completion_tokens"],
    }


def help_margins(policy: Policy, batch: Rollout, branches: tuple[Any, ...]) -> list[float]:
    """`Policy.help_margins` of every completion of `batch`, in micro-batches."""
    out: list[float] = []
    for start in range(0, len(batch.prompt_ids), MARGIN_BATCH):
        rows = torch.arange(start, min(start + MARGIN_BATCH, len(batch.prompt_ids)))
        sub = batch.select(rows)
        device = policy.device
        margins = policy.help_margins(
            sub.input_ids.to(device), sub.attention_mask.to(device), sub.completion_len, branches
        )
        out.extend(margins.cpu().tolist())
    return out


def help_curve(
    result: EvalResult, cloud_correct: list[bool], rates: tuple[float, ...]
) -> list[tuple[float, float]]:
    """(cloud rate, accuracy) without a cap of one trained policy under a sweep of a bias b added to
    its help action's logit: a greedy completion calls iff its margin exceeds -b, so at each rate the
    prompts of the largest margins call and the others keep the answer the policy gives on its own.
    A completion that never reaches a branch position (margin -inf) calls under no finite bias, so the
    curve stops at the share of prompts that can call."""
    reachable = sum(math.isfinite(m) for m in result.margins) / max(len(result.margins), 1)
    return threshold_curve(result.alone, cloud_correct, result.margins, [r for r in rates if r <= reachable])
