"""A causal LM as a policy over tokens: log-probabilities of completions, optional value head.

Sequences are laid out as [left-padded prompt | right-padded completion], so every completion
starts at the same column `prompt_len`; only the logits of completion positions are computed,
which matters when prompts are long and the vocabulary is large; the prompt start that all
rows share is computed once, and so is each prompt's own part, whatever the number of its completions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from collab_env.config import DeviceConfig
from collab_env.errors import DependencyNotInstalled
from collab_env.markers import HelpBranch
from collab_env.models import load_model, load_tokenizer

SHARED_PREFIX_MIN = 8
"""A shared prompt start shorter than this is recomputed per row (not worth a second model call)."""


def pick_device(name: str) -> str:
    """`auto` is cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@dataclass
class PolicyOutput:
    """Per completion token (N, Lc): log pi(token | prefix), and optionally entropy, value V(prefix)
    and the help decision's part of log pi (`decision_logprobs`, see `HelpChoices`)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None
    decision_logprobs: torch.Tensor | None = None


def branch_positions(
    completion: torch.Tensor, written: torch.Tensor, branches: tuple[HelpBranch, ...]
) -> list[torch.Tensor]:
    """Per branch, (N, Lc) True at the completion positions where its prefix has just been written,
    i.e. where writing its token would start the marker: where the completion could call for help."""
    completion_len = completion.shape[1]
    open_at = []
    for branch in branches:
        width = len(branch.prefix)
        at = written.bool().clone()
        at[:, :width] = False
        for offset, token in enumerate(branch.prefix):
            at[:, width:] &= completion[:, offset : completion_len - width + offset] == token
        open_at.append(at)
    return open_at


@dataclass(frozen=True)
class HelpChoices:
    """Where a completion could call for help, for splitting log pi into decision and content.

    At a position where the marker could start, choosing a token is two choices: call (a help token,
    probability p_help) or not, then which token. So log pi(y_t) = d_t + c_t exactly, with the
    decision d_t = log p_help if y_t calls, log(1 - p_help) if not, and the content c_t = log pi(y_t
    | the decision taken) (0 where it called with the only help token open); at every other position
    d_t = 0. A bias on the help tokens' logits changes d_t and leaves c_t as it is."""

    tokens: tuple[int, ...]
    """The help tokens (the distinct branch tokens)."""
    branches: tuple[HelpBranch, ...]

    @classmethod
    def of(cls, branches: list[HelpBranch]) -> HelpChoices:
        return cls(tuple(dict.fromkeys(b.token for b in branches)), tuple(branches))

    def open_tokens(self, completion: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        """(N, Lc, len(tokens)) True where that help token would start the marker."""
        open_at = branch_positions(completion, written, self.branches)
        out = torch.zeros((*completion.shape, len(self.tokens)), dtype=torch.bool, device=completion.device)
        for branch, at in zip(self.branches, open_at, strict=True):
            out[..., self.tokens.index(branch.token)] |= at
        return out


def decision_logprobs(
    logits: torch.Tensor,
    log_norm: torch.Tensor,
    targets: torch.Tensor,
    tokens: torch.Tensor,
    open_tokens: torch.Tensor,
) -> torch.Tensor:
    """(N, Lc) d_t of `HelpChoices`: log p_help where the completion called, log(1 - p_help) where it
    could have and did not, 0 elsewhere (p_help 0)."""
    help_probs = torch.exp(logits[..., tokens] - log_norm[..., None]) * open_tokens
    p_help = help_probs.sum(-1)
    called = ((targets[..., None] == tokens) & open_tokens).any(-1)
    # Clamped so that neither branch of the `where` has an infinite gradient.
    return torch.where(called, torch.log(p_help.clamp(min=1e-30)), torch.log1p(-p_help.clamp(max=1 - 1e-6)))


def distinct_prompts(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first row of each distinct (left-padded) prompt, and each row's index among those."""
    key = torch.cat([prompt_ids * prompt_mask, prompt_mask], dim=1)  # the ids under padding do not count
    _, prompt_of_row = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(len(key), device=key.device)
    first = torch.full((int(prompt_of_row.max()) + 1,), len(key), device=key.device)
    return first.scatter_reduce(0, prompt_of_row, rows, reduce="amin"), prompt_of_row


def shared_start(input_ids: torch.Tensor, starts: torch.Tensor, shortest: int) -> int:
    """Tokens at the start of every row's prompt (row i's begins at column starts[i]) that all rows
    share, leaving at least one prompt token of each row (the `shortest` prompt's length) its own."""
    if len(input_ids) < 2 or shortest < 2:
        return 0
    offsets = torch.arange(shortest - 1, device=input_ids.device)
    tokens = input_ids.gather(1, starts[:, None] + offsets[None])
    same = (tokens == tokens[:1]).all(dim=0).long()
    return int(same.cumprod(dim=0).sum())


def _extend(
    decoder: nn.Module,
    cache: DynamicCache | None,
    past_mask: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of `input_ids` after the columns in `cache` (masked by `past_mask`; their
    keys and values join the cache), and the attention mask of all the columns."""
    mask = torch.cat([past_mask, attention_mask], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_mask.shape[1] :]
    out = decoder(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=cache is not None,
    )
    return out.last_hidden_state, mask


class Policy(nn.Module):
    """Wraps a causal LM (optionally LoRA, optionally with a scalar value head for PPO)."""

    def __init__(self, model: Any, tokenizer: Any, value_head: bool = False) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        hidden = model.config.hidden_size
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(device=self.device, dtype=torch.float32)

    @classmethod
    def load(
        cls,
        device_config: DeviceConfig,
        device: str = "cpu",
        lora_rank: int = 0,
        gradient_checkpointing: bool = False,
        value_head: bool = False,
    ) -> Policy:
        model = load_model(device_config, device=device)
        if lora_rank > 0:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as err:
                raise DependencyNotInstalled(
                    "train.lora_rank > 0 needs peft: pip install 'devicecloud[lora]'"
                ) from err
            lora = LoraConfig(
                r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear", lora_dropout=0.0
            )
            model = get_peft_model(model, lora)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        return cls(model, load_tokenizer(device_config), value_head=value_head)

    @property
    def transformers_model(self) -> nn.Module:
        """The transformers model inside: for a LoRA policy peft's base model, whose linear layers
        are peft's LoRA layers (calling them computes with the adapters); else the model itself."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_len: int,
        with_entropy: bool = False,
        help_choices: HelpChoices | None = None,
    ) -> PolicyOutput:
        """Scores the last `completion_len` tokens of each row given everything before them (and, with
        `help_choices`, the help decision's part of each token's log-probability).

        The prompt start all rows share (chat template and system prompt: most of a short prompt)
        goes through the model once and its keys and values serve every row; gradients flow through
        it as through any other position, so this is the full forward, computed with fewer tokens.
        """
        hidden = self._completion_hidden(input_ids, attention_mask, completion_len)
        logits = self.model.get_output_embeddings()(hidden)[..., : self.vocab_size].float()
        targets = input_ids[:, -completion_len:]
        log_norm = torch.logsumexp(logits, dim=-1)
        logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
        entropy = None
        if with_entropy:
            probs = torch.softmax(logits, dim=-1)
            entropy = log_norm - (probs * logits).sum(-1)
        values = None
        if self.value_head is not None:
            values = self.value_head(hidden.float()).squeeze(-1)
        decision = None
        if help_choices is not None:
            open_tokens = help_choices.open_tokens(targets, attention_mask[:, -completion_len:])
            tokens = torch.tensor(help_choices.tokens, device=targets.device)
            decision = decision_logprobs(logits, log_norm, targets, tokens, open_tokens)
        return PolicyOutput(logprobs, entropy, values, decision)

    def _completion_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int
    ) -> torch.Tensor:
        """Final hidden states of the positions that predict the completion tokens (N, Lc, hidden).

        Each part of a row goes through the model once for every row that has it: the prompt start
        all rows share, then each distinct prompt's own part (once, not once for each of its G
        completions), then every row's completion, attending to the cached keys and values before it.
        """
        decoder = self.model.get_decoder()
        rows, prompt_width = len(input_ids), input_ids.shape[1] - completion_len
        prompts, prompt_of_row = distinct_prompts(
            input_ids[:, :prompt_width], attention_mask[:, :prompt_width]
        )
        checkpointing = getattr(self.model, "is_gradient_checkpointing", False)
        if checkpointing or len(prompts) == rows:
            cache, past, ids, mask = self._shared_start(decoder, input_ids, attention_mask, prompt_width)
            return _extend(decoder, cache, past, ids, mask)[0][:, -completion_len - 1 : -1]
        cache, past, ids, mask = self._shared_start(
            decoder, input_ids[prompts, :prompt_width], attention_mask[prompts, :prompt_width], prompt_width
        )
        cache = DynamicCache() if cache is None else cache
        prompt_hidden, prompt_mask = _extend(decoder, cache, past, ids, mask)
        cache.batch_select_indices(prompt_of_row)  # each row attends to its prompt's keys and values
        completion_hidden, _ = _extend(
            decoder,
            cache,
            prompt_mask[prompt_of_row],
            input_ids[:, prompt_width:],
            attention_mask[:, prompt_width:],
        )
        return torch.cat([prompt_hidden[prompt_of_row, -1:], completion_hidden[:, :-1]], dim=1)

    def _shared_start(
        self, decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
    ) -> tuple[DynamicCache | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompt start every row shares, computed once into a cache repeated for every row: that
        cache (None when nothing is shared), its attention mask, and the columns left to compute with
        their mask."""
        rows = len(input_ids)
        lengths = attention_mask[:, :prompt_width].sum(dim=1)
        starts = prompt_width - lengths  # prompts are left-padded: row i's starts at column starts[i]
        prefix = self._shared_prefix_len(input_ids, starts, int(lengths.min()))
        if not prefix:
            return None, attention_mask[:, :0], input_ids, attention_mask
        cache = DynamicCache()
        first = int(starts[0])
        decoder(input_ids=input_ids[:1, first : first + prefix], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(rows)
        # Keep the columns from where the longest prompt's own part begins; in shorter rows the
        # first of them still hold (a copy of) the shared prefix or padding, which is masked out.
        cut = prompt_width - (int(lengths.max()) - prefix)
        columns = torch.arange(cut, input_ids.shape[1], device=input_ids.device)
        own = (columns[None] >= (starts + prefix)[:, None]).to(attention_mask.dtype) * attention_mask[:, cut:]
        return cache, attention_mask.new_ones((rows, prefix)), input_ids[:, cut:], own

    def _shared_prefix_len(self, input_ids: torch.Tensor, starts: torch.Tensor, shortest: int) -> int:
        """`shared_start` where computing it once pays and can be used, else 0."""
        if getattr(self.model, "is_gradient_checkpointing", False):
            return 0  # gradient checkpointing drops the cache the prefix would live in
        length = shared_start(input_ids, starts, shortest)
        return length if length >= SHARED_PREFIX_MIN else 0

    @property
    def head_cost(self) -> float:
        """Multiply-adds of the LM head per position over the decoder's: the head runs on completion
        positions only, so a completion column costs 1 + head_cost prompt columns."""
        head = self.model.get_output_embeddings().weight.numel()
        decoder = sum(p.numel() for p in self.model.get_decoder().parameters())
        return head / (decoder - self.model.get_input_embeddings().weight.numel())

    @torch.no_grad()
    def help_margins(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_len: int,
        branches: tuple[HelpBranch, ...],
    ) -> torch.Tensor:
        """(N,) how near each completion came to calling for help: over the completion positions where a
        branch's prefix has just been written, the largest margin of the help action (the best branch
        token open there) over the best other token (positive where the completion called; -inf where
        it never could).

        A bias b on the help action's logit makes greedy decoding call at the first position whose
        margin exceeds -b, so sorting prompts by margin traces one trained policy's accuracy-vs-cloud-
        rate curve."""
        open_at = branch_positions(
            input_ids[:, -completion_len:], attention_mask[:, -completion_len:], branches
        )
        rows, columns = torch.stack(open_at).any(0).nonzero(as_tuple=True)
        best = torch.full((len(input_ids),), -math.inf, device=input_ids.device)
        if not len(rows):
            return best
        hidden = self._completion_hidden(input_ids, attention_mask, completion_len)
        logits = self.model.get_output_embeddings()(hidden[rows, columns])[..., : self.vocab_size].float()
        active = torch.zeros_like(logits, dtype=torch.bool)
        for branch, at in zip(branches, open_at, strict=True):
            active[at[rows, columns], branch.token] = True
        margins = logits.masked_fill(~active, -math.inf).max(-1).values
        margins = margins - logits.masked_fill(active, -math.inf).max(-1).values
        return best.scatter_reduce(0, rows, margins, reduce="amax")

    def next_token_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of the next token after each (right-padded) row, without a cache (for env stepping)."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).logits
        last = attention_mask.long().sum(-1) - 1
        return logits[torch.arange(len(last), device=logits.device), last, : self.vocab_size].float()
