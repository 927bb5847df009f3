"""The `hf` backend: batched sampling with a KV cache on any transformers causal LM.

Our own decode loop instead of `model.generate`: it records the sampling log-probabilities as it
goes, stops each row with the environment's own stop rules (EOS, the call-for-help marker, the end
of the answer), and drops finished rows from the batch and the cache, so a batch costs what its
longest live rows cost rather than `rows x max_new_tokens`.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from agents.rollout.base import GeneratingRollout, Generation


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens and their log-probabilities under the sampling distribution (rows of `logits`)."""
    if greedy:
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        outside = sorted_lp.exp().cumsum(-1) - sorted_lp.exp() > top_p
        sorted_lp = sorted_lp.masked_fill(outside, float("-inf"))
        logprobs = torch.full_like(logprobs, float("-inf")).scatter(-1, order, sorted_lp)
        logprobs = torch.log_softmax(logprobs, dim=-1)
    tokens = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


class HFRollout(GeneratingRollout):
    """Batched generation with a KV cache; rows leave the batch as soon as they stop."""

    @torch.no_grad()
    def generate(self, prompts: list[np.ndarray], max_new_tokens: int, greedy: bool, seed: int) -> Generation:
        completions: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
        for start in range(0, len(order), self.config.max_batch):
            chunk = order[start : start + self.config.max_batch]
            self._generate_chunk(
                [prompts[i] for i in chunk],
                max_new_tokens,
                greedy,
                seed + start,
                chunk,
                completions,
                logprobs,
            )
        return Generation(completions, logprobs)

    def _generate_chunk(
        self,
        prompts: list[np.ndarray],
        max_new_tokens: int,
        greedy: bool,
        seed: int,
        rows: list[int],
        completions: list[list[int]],
        logprobs: list[list[float]],
    ) -> None:
        model, device = self.policy.model, self.policy.device
        pad_id = int(self.policy.tokenizer.pad_token_id)
        generator = torch.Generator(device=device).manual_seed(seed)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.as_tensor(prompt)
            attention[i, width - len(prompt) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        was_training = model.training
        model.eval()
        out = model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        next_position = positions[:, -1] + 1
        live = list(range(len(prompts)))  # positions in this chunk of the rows still generating
        states = [self.env.start_completion() for _ in prompts]
        vocab = self.policy.vocab_size
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1, :vocab].float()
            tokens, token_logprobs = sample_tokens(
                logits, self.config.temperature, self.config.top_p, greedy, generator
            )
            keep = []
            for j, (token, lp) in enumerate(zip(tokens.tolist(), token_logprobs.tolist(), strict=True)):
                i = live[j]
                completions[rows[i]].append(token)
                logprobs[rows[i]].append(lp)
                if states[i].feed(token) is None and len(completions[rows[i]]) < max_new_tokens:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(live):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                tokens, attention, next_position = tokens[index], attention[index], next_position[index]
                live = [live[j] for j in keep]
            attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
            out = model(
                input_ids=tokens[:, None],
                attention_mask=attention,
                position_ids=next_position[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            next_position = next_position + 1
        model.train(was_training)
