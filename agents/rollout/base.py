"""What every rollout backend produces, and the scoring step they share.

A backend turns prompts x G into completions with the per-token log-probabilities of the
sampling policy; the completions are then scored by the environment's own `score_many`, so
rewards mean exactly what stepping `DeviceCloud-v0` would give.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from agents.batch import Rollout, pad_batch
from agents.config import RolloutConfig
from agents.policy import Policy
from collab_env.decoding import Generation


class RolloutEngine(ABC):
    """Produces G scored completions per prompt with a policy."""

    def __init__(self, policy: Policy, env: Any, config: RolloutConfig, seed: int = 0) -> None:
        self.policy = policy
        self.env = env.unwrapped
        self.config = config
        self.seed = seed

    @abstractmethod
    def rollout(
        self,
        prompt_ids: list[int],
        group_size: int,
        greedy: bool = False,
        max_new_tokens: int | None = None,
        seed: int | None = None,
    ) -> Rollout:
        """G samples for each prompt, with the rewards and final infos of the environment."""

    def sync_weights(self) -> None:
        """Push the policy's new weights to an external engine (vLLM); in-process backends share them."""

    def _assemble(
        self,
        expanded: list[int],
        prompts: list[np.ndarray],
        generation: Generation,
        scored: list[tuple[float, dict]],
        group_size: int,
    ) -> Rollout:
        input_ids, attention, completion_mask, logprobs = pad_batch(
            prompts, generation, int(self.env.tokenizer.pad_token_id)
        )
        return Rollout(
            prompt_ids=expanded,
            groups=torch.arange(len(expanded)) // group_size,
            group_size=group_size,
            input_ids=input_ids,
            attention_mask=attention,
            completion_mask=completion_mask,
            old_logprobs=logprobs,
            rewards=torch.tensor([r for r, _ in scored], dtype=torch.float32),
            infos=[info for _, info in scored],
        )


class GeneratingRollout(RolloutEngine):
    """Backends that generate whole completions, then score them with `env.score_many`."""

    @abstractmethod
    def generate(
        self, prompts: list[np.ndarray], max_new_tokens: int, greedy: bool, seed: int, help_bias: float = 0.0
    ) -> Generation:
        """Completions for each prompt (already repeated G times), stopping at EOS, marker or answer end;
        `help_bias` is added to the help action's logit (collab_env.decoding.DecodeRequest)."""

    def rollout(
        self,
        prompt_ids: list[int],
        group_size: int,
        greedy: bool = False,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        help_bias: float = 0.0,
    ) -> Rollout:
        expanded = [pid for pid in prompt_ids for _ in range(group_size)]
        prompts = [self.env.prompt_tokens(pid) for pid in expanded]
        limit = max_new_tokens or self.env.config.max_new_tokens
        generation = self.generate(prompts, limit, greedy, self.seed if seed is None else seed, help_bias)
        scored = self.env.score_many(expanded, generation.completions)
        return self._assemble(expanded, prompts, generation, scored, group_size)
