"""The `env` backend: every token is an action of `DeviceCloudVectorEnv`, one sub-env per sequence.

Slow (a full forward pass per token, no KV cache) but exact: rewards and infos are the ones the
environment returns at the end of each episode, which is how a generic agent experiences it.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from agents.batch import Rollout
from agents.rollout.base import RolloutEngine
from collab_env.decoding import Generation, sample_tokens


def unbatch_info(infos: dict[str, Any], index: int) -> dict[str, Any]:
    """The info dict of sub-env `index` from a Gymnasium vector info (values plus `_key` masks)."""
    out = {}
    for key, value in infos.items():
        if key.startswith("_") or not infos.get(f"_{key}", np.zeros(index + 1, bool))[index]:
            continue
        out[key] = unbatch_info(value, index) if isinstance(value, dict) else _scalar(value[index])
    return out


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


class EnvRollout(RolloutEngine):
    @torch.no_grad()
    def rollout(
        self,
        prompt_ids: list[int],
        group_size: int,
        greedy: bool = False,
        max_new_tokens: int | None = None,
        seed: int | None = None,
    ) -> Rollout:
        expanded = [pid for pid in prompt_ids for _ in range(group_size)]
        seed = self.seed if seed is None else seed
        kwargs = {**self.env.spec.kwargs}
        if max_new_tokens:
            kwargs["max_new_tokens"] = max_new_tokens
        vec = gym.make_vec(
            self.env.spec.id, num_envs=len(expanded), vectorization_mode="vector_entry_point", **kwargs
        )
        obs, _ = vec.reset(seed=seed, options={"prompt_ids": expanded})
        generator = torch.Generator(device=self.policy.device).manual_seed(seed)
        done = np.zeros(len(expanded), dtype=bool)
        completions: list[list[int]] = [[] for _ in expanded]
        logprobs: list[list[float]] = [[] for _ in expanded]
        scored: list[tuple[float, dict[str, Any]]] = [(0.0, {}) for _ in expanded]
        while not done.all():
            ids = torch.as_tensor(obs["input_ids"], device=self.policy.device)
            mask = torch.as_tensor(obs["attention_mask"], device=self.policy.device).long()
            logits = self.policy.next_token_logits(ids, mask)
            tokens, token_logprobs = sample_tokens(
                logits, self.config.temperature, self.config.top_p, greedy, generator
            )
            obs, rewards, terminated, truncated, infos = vec.step(tokens.cpu().numpy())
            for i in np.flatnonzero(~done):
                completions[i].append(int(tokens[i]))
                logprobs[i].append(float(token_logprobs[i]))
                if terminated[i] or truncated[i]:
                    done[i] = True
                    scored[i] = (float(rewards[i]), unbatch_info(infos, i))
        vec.close()
        prompts = [self.env.prompt_tokens(pid) for pid in expanded]
        return self._assemble(expanded, prompts, Generation(completions, logprobs), scored, group_size)
