"""A causal LM as actor-critic over `DeviceCloud-v0`'s `Discrete(vocab + 1)` actions, for the
Stable-Baselines3 and Tianshou adapters (agents.sb3, agents.tianshou).

Cost model: those libraries step one token at a time and keep no KV cache, so every step runs the
LM over the whole prefix (prompt and completion so far). An episode of T new tokens on a prompt of P
tokens costs T forwards of up to P + T tokens; `agent=ppo` (agents.ppo) is the batched, KV-cached way
to train an LM on this env.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from agents.config import RunConfig
from agents.policy import pick_device
from agents.runs import resolve_device
from collab_env.models import load_model


class LMHeadWithHelp(nn.Module):
    """The LM head's logits over the env's vocabulary, then one logit for the call-for-help action.

    The help logit is a fresh linear read-out of the same hidden state, initialised to 0."""

    def __init__(self, lm_head: nn.Module, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.vocab_size = vocab_size
        self.help = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.help.weight)
        nn.init.zeros_(self.help.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = next(self.lm_head.parameters()).dtype
        # Models may pad the output vocabulary past the tokenizer's; the env's actions stop at len(tokenizer).
        vocab = self.lm_head(hidden.to(dtype))[..., : self.vocab_size].float()
        return torch.cat([vocab, self.help(hidden)], dim=-1)


class TokenActorCritic(nn.Module):
    """A causal LM as actor-critic over `DeviceCloud-v0`'s `Discrete(vocab + 1)` actions.

    `hidden(input_ids, attention_mask)` is the last hidden state at the last token of each
    right-padded observation; `policy_head` maps it to vocab + 1 logits, `value_head` to V(s).
    """

    def __init__(self, model: Any, vocab_size: int, value_hidden: int = 64) -> None:
        super().__init__()
        self.lm = model
        self.hidden_size = int(model.config.hidden_size)
        device = next(model.parameters()).device
        self.policy_head = LMHeadWithHelp(model.get_output_embeddings(), self.hidden_size, vocab_size).to(
            device
        )
        self.value_head = nn.Sequential(
            nn.Linear(self.hidden_size, value_hidden), nn.Tanh(), nn.Linear(value_hidden, 1)
        ).to(device)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # SB3 hands Box observations over as float32 and Tianshou may too: the embedding needs int64
        # (exact for ids below 2**24, far above any vocabulary).
        input_ids, attention_mask = input_ids.long(), attention_mask.long()
        lengths = attention_mask.sum(-1)
        # Observations are right-padded to the env's max_len; columns past the longest row are dead weight.
        width = max(int(lengths.max()), 1)
        out = self.lm.base_model(
            input_ids=input_ids[:, :width], attention_mask=attention_mask[:, :width], use_cache=False
        )
        last = (lengths - 1).clamp(min=0)
        return out.last_hidden_state[torch.arange(len(last), device=last.device), last].float()


def load_token_actor_critic(run: RunConfig, vocab_size: int) -> TokenActorCritic:
    """The run's device model (tiny-arith built first if needed) wrapped as `TokenActorCritic`."""
    return TokenActorCritic(load_model(resolve_device(run), device=pick_device(run.train.device)), vocab_size)
