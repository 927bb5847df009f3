"""Batched decoding with a KV cache, shared by the environments (greedy answers of the routing env)
and the agents' rollouts: sampling, the env's stop rules per row, and the generic decode loop for any
causal LM (`decode_dynamic`). The LLaMA-family fast path lives in `agents.rollout.hf`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from collab_env.markers import CompletionState, HelpBranch


@dataclass
class Generation:
    """Raw completions: token ids per sequence (stop token included) and their sampling log-probs."""

    completions: list[list[int]]
    logprobs: list[list[float]]


SAMPLING_BLOCK = 256
"""Vocabulary entries per block of the two-level inverse-CDF sampler."""


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens and their log-probabilities under the sampling distribution (rows of `logits`)."""
    if greedy:
        tokens = logits.argmax(dim=-1)
        return tokens, logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)
    scaled = logits if temperature == 1.0 else logits / temperature
    if top_p < 1.0:
        logprobs = torch.log_softmax(scaled, dim=-1)
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        outside = sorted_lp.exp().cumsum(-1) - sorted_lp.exp() > top_p
        sorted_lp = sorted_lp.masked_fill(outside, float("-inf"))
        logprobs = torch.full_like(logprobs, float("-inf")).scatter(-1, order, sorted_lp)
        logprobs = torch.log_softmax(logprobs, dim=-1)
        tokens = inverse_cdf_sample(logprobs.exp(), generator)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    # One fused softmax pass; a drawn token has a positive probability, so its log is finite and
    # as exact as a log-softmax entry (sub-then-exp took 3x longer on CPU).
    probs = torch.softmax(scaled, dim=-1)
    tokens = inverse_cdf_sample(probs, generator)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()


def _below(bound: torch.Tensor) -> torch.Tensor:
    """The largest float64 below `bound`: a draw scaled by a total can round up onto the total."""
    return torch.nextafter(bound, torch.zeros_like(bound))


def inverse_cdf_sample(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row, drawn with probability proportional to the row's (unnormalised) `weights`.

    `torch.multinomial` draws one exponential per vocabulary entry, and a float64 cumulative sum over
    the whole vocabulary cost as much again: here one uniform per row picks a block of
    `SAMPLING_BLOCK` entries by the blocks' masses (cumulated in float64), then an entry inside the
    block. An entry of weight 0 spans an empty interval at both levels, so it is never drawn.
    """
    rows, vocab = weights.shape
    if vocab % SAMPLING_BLOCK:
        weights = F.pad(weights, (0, -vocab % SAMPLING_BLOCK))
    padded = weights.view(rows, -1, SAMPLING_BLOCK)
    # Block sums in the weights' dtype (a float64 reduction over the vocabulary was 25x slower).
    mass = padded.sum(dim=-1).double()
    cdf = mass.cumsum(dim=-1)
    uniform = torch.rand((rows, 1), generator=generator, device=weights.device, dtype=torch.float64)
    draw = torch.minimum(uniform * cdf[:, -1:], _below(cdf[:, -1:]))
    block = torch.searchsorted(cdf, draw, right=True)
    before = torch.where(block > 0, cdf.gather(-1, (block - 1).clamp(min=0)), torch.zeros_like(draw))
    inner = padded.gather(1, block[:, :, None].expand(rows, 1, SAMPLING_BLOCK)).squeeze(1).double().cumsum(-1)
    # The block's own float64 cumulative sum can differ from its mass in the last bits: rescale.
    offset = (draw - before) * inner[:, -1:] / mass.gather(-1, block)
    entry = torch.searchsorted(inner, torch.minimum(offset, _below(inner[:, -1:])), right=True)
    return (block * SAMPLING_BLOCK + entry).squeeze(-1)


@dataclass
class DecodeRequest:
    """One batch to decode: left-aligned prompts, the sampling settings and the stop rules."""

    prompts: list[np.ndarray]
    max_new_tokens: int
    temperature: float
    top_p: float
    greedy: bool
    generator: torch.Generator
    vocab: int
    """Logits past this index (padding rows of the embedding matrix) are never sampled."""
    start_state: Callable[[], CompletionState] | None
    """A fresh env stop-rule state per row; None decodes every row to `max_new_tokens`."""
    pad_id: int
    help_bias: float = 0.0
    """Added to the logit of the help action, the branch token of `help_branches`, wherever a row can
    write it; -inf bans calling for help (how a device answers on its own when the cloud refuses)."""
    help_branches: tuple[HelpBranch, ...] = ()


def bias_help(logits: torch.Tensor, written: torch.Tensor, request: DecodeRequest) -> torch.Tensor:
    """`logits` (rows, vocab) of the next token after `written` (rows, tokens so far) with
    `request.help_bias` added to the branch token of each row that has just written a branch's prefix."""
    logits = logits.clone()
    for branch in request.help_branches:
        width = len(branch.prefix)
        if written.shape[1] < width:
            continue
        prefix = torch.as_tensor(branch.prefix, device=written.device)
        rows = (written[:, written.shape[1] - width :] == prefix).all(dim=1)
        logits[rows, branch.token] += request.help_bias
    return logits


def stops(
    states: list[CompletionState] | None, rows: list[int], tokens: list[int], step: int, limit: int
) -> list[bool]:
    """Whether each row (original index in `rows`) ends with this token, by the env's own stop rules."""
    if step + 1 >= limit:
        return [True] * len(rows)
    if states is None:
        return [False] * len(rows)
    return [states[row].feed(token) is not None for row, token in zip(rows, tokens, strict=True)]


def to_generation(tokens: torch.Tensor, logprobs: torch.Tensor, lengths: list[int]) -> Generation:
    """One host copy of the (rows, max_new_tokens) buffers, cut to each row's length."""
    token_rows, logprob_rows = tokens.cpu().tolist(), logprobs.cpu().tolist()
    return Generation(
        [row[:n] for row, n in zip(token_rows, lengths, strict=True)],
        [row[:n] for row, n in zip(logprob_rows, lengths, strict=True)],
    )


@torch.no_grad()
def decode_dynamic(model: torch.nn.Module, request: DecodeRequest) -> Generation:
    """The generic decode loop for any causal LM: a transformers DynamicCache, finished rows dropped."""
    device = next(model.parameters()).device
    n, limit = len(request.prompts), request.max_new_tokens
    width = max(len(p) for p in request.prompts)
    input_ids = torch.full((n, width), request.pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, prompt in enumerate(request.prompts):
        input_ids[i, width - len(prompt) :] = torch.as_tensor(prompt)
        attention[i, width - len(prompt) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    next_position = positions[:, -1] + 1
    tokens_out = torch.zeros((n, limit), dtype=torch.long, device=device)
    logprobs_out = torch.zeros((n, limit), dtype=torch.float32, device=device)
    lengths = [limit] * n
    states = [request.start_state() for _ in range(n)] if request.start_state else None
    live = list(range(n))
    for step in range(limit):
        index = torch.as_tensor(live, device=device)
        logits = out.logits[:, -1, : request.vocab].float()
        if request.help_bias:
            logits = bias_help(logits, tokens_out[index, :step], request)
        tokens, token_logprobs = sample_tokens(
            logits, request.temperature, request.top_p, request.greedy, request.generator
        )
        tokens_out[index, step] = tokens
        logprobs_out[index, step] = token_logprobs
        host = tokens.tolist() if states is not None else [0] * len(live)
        stopped = stops(states, live, host, step, limit)
        keep = [j for j, stop in enumerate(stopped) if not stop]
        for j, stop in enumerate(stopped):
            if stop:
                lengths[live[j]] = step + 1
        if not keep:
            break
        if len(keep) < len(live):
            index = torch.as_tensor(keep, device=device)
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
    return to_generation(tokens_out, logprobs_out, lengths)
