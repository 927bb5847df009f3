"""The batch every algorithm learns from: N = prompts x G scored sequences, and how it is padded.

Rollout backends (agents.rollout) fill it, algorithms (agents.gapg, agents.grpo, agents.ppo) read it,
and agents.distributed gathers it across ranks, so it sits below all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from collab_env.decoding import Generation


@dataclass
class Rollout:
    """A scored batch of N = prompts x G sequences, laid out [left-padded prompt | completion]."""

    prompt_ids: list[int]
    """Env prompt id of each sequence."""
    groups: torch.Tensor
    """(N,) index of the sequence's prompt within this batch; a group = the G samples of one prompt."""
    group_size: int
    input_ids: torch.Tensor
    """(N, Lp + Lc) token ids."""
    attention_mask: torch.Tensor
    """(N, Lp + Lc) 1 on prompt and completion tokens."""
    completion_mask: torch.Tensor
    """(N, Lc) 1.0 on completion tokens (the stop token included), 0.0 on padding."""
    old_logprobs: torch.Tensor
    """(N, Lc) log-probabilities of the sampled tokens under the sampling policy."""
    rewards: torch.Tensor
    """(N,) hierarchical reward of each sequence (float32)."""
    infos: list[dict[str, Any]]
    """The env's final info of each sequence (outcome, called_help, local_correct, ...)."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Algorithm-specific per-sequence tensors (e.g. values for PPO)."""

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids) // self.group_size

    @property
    def completion_len(self) -> int:
        return self.completion_mask.shape[1]

    def flag(self, key: str) -> torch.Tensor:
        """(prompts, G) boolean matrix of an info key (None counts as False)."""
        values = [bool(info[key]) for info in self.infos]
        return torch.tensor(values, dtype=torch.bool).view(self.num_prompts, self.group_size)

    def select(self, rows: torch.Tensor) -> Rollout:
        """The sub-batch of the given sequence indices (groups keep their ids)."""
        index = rows.tolist()
        return Rollout(
            prompt_ids=[self.prompt_ids[i] for i in index],
            groups=self.groups[rows],
            group_size=self.group_size,
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            completion_mask=self.completion_mask[rows],
            old_logprobs=self.old_logprobs[rows],
            rewards=self.rewards[rows],
            infos=[self.infos[i] for i in index],
            extras={k: v[rows] for k, v in self.extras.items()},
        )


def pad_batch(prompts: list[np.ndarray], generation: Generation, pad_id: int) -> tuple[torch.Tensor, ...]:
    """Left-pad prompts and right-pad completions into (input_ids, attention_mask, completion_mask, logprobs)."""
    n = len(prompts)
    prompt_len = max(len(p) for p in prompts)
    completion_len = max(1, max(len(c) for c in generation.completions))
    input_ids = torch.full((n, prompt_len + completion_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, prompt_len + completion_len), dtype=torch.long)
    completion_mask = torch.zeros((n, completion_len), dtype=torch.float32)
    logprobs = torch.zeros((n, completion_len), dtype=torch.float32)
    for i, (prompt, completion, lps) in enumerate(
        zip(prompts, generation.completions, generation.logprobs, strict=True)
    ):
        start = prompt_len - len(prompt)
        input_ids[i, start:prompt_len] = torch.as_tensor(prompt, dtype=torch.long)
        attention[i, start:prompt_len] = 1
        k = len(completion)
        input_ids[i, prompt_len : prompt_len + k] = torch.as_tensor(completion, dtype=torch.long)
        attention[i, prompt_len : prompt_len + k] = 1
        completion_mask[i, :k] = 1.0
        logprobs[i, :k] = torch.as_tensor(lps, dtype=torch.float32)
    return input_ids, attention, completion_mask, logprobs
