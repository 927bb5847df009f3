"""The `hf` backend: batched sampling with a KV cache on any transformers causal LM.

Our own decode loop instead of `model.generate`: it records the sampling log-probabilities as it
goes, stops each row with the environment's own stop rules (EOS, the call-for-help marker, the end
of the answer), and stops computing finished rows.

LLaMA-family models (LLaMA, SmolLM2, Qwen2/2.5) take a fast path, `StaticKVDecoder`, built on
what a profile of `generate` showed (docs/performance.md): the dynamic cache copies every key and
value once per token (`torch.cat`) and again to repeat them for grouped-query attention, the
prompt prefill is recomputed for each of the G copies of a prompt and for the system prompt they
all share, and `torch.multinomial` draws one exponential per vocabulary entry. The fast path
preallocates the cache, attends each KV head once for the query heads that share it, prefills a
shared prefix once and each distinct prompt once, and samples by inverse CDF (one uniform per
row). A LoRA policy takes it too (its base model's projections are peft's LoRA layers); any other
model takes `decode_dynamic`, the generic loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from agents.rollout.base import GeneratingRollout
from collab_env.decoding import (
    DecodeRequest,
    Generation,
    bias_help,
    decode_dynamic,
    sample_tokens,
    stops,
    to_generation,
)
from collab_env.markers import HelpBranch

COMPACT_BELOW = 0.75
"""The fast path drops finished rows once at most this share of its rows is still running: dropping
copies the cache, keeping a finished row costs its share of every later step."""


@dataclass
class _KVCache:
    """Keys and values of a batch: the prefix every row shares once, then each row's own columns.

    `prefix_keys[layer]` is (kv_heads, prefix, head_dim), stored once for all rows; `keys[layer]`
    is (rows, kv_heads, capacity, head_dim), whose columns past `length` are unset.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    prefix_keys: list[torch.Tensor]
    prefix_values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, layers: int, shape: tuple[int, ...], like: torch.Tensor) -> _KVCache:
        # Unset columns are never read: attention only sees columns below `length`.
        return cls(
            [like.new_empty(shape) for _ in range(layers)],
            [like.new_empty(shape) for _ in range(layers)],
            [],
            [],
        )

    @property
    def prefix(self) -> int:
        return self.prefix_keys[0].shape[1] if self.prefix_keys else 0

    def select(self, rows: torch.Tensor) -> _KVCache:
        """The cache of `rows` only (their written columns copied, the shared prefix kept)."""
        keys, values = [], []
        for k, v in zip(self.keys, self.values, strict=True):
            new_k, new_v = k.new_empty((len(rows), *k.shape[1:])), v.new_empty((len(rows), *v.shape[1:]))
            new_k[:, :, : self.length] = k[rows, :, : self.length]
            new_v[:, :, : self.length] = v[rows, :, : self.length]
            keys.append(new_k)
            values.append(new_v)
        return _KVCache(keys, values, self.prefix_keys, self.prefix_values, self.length)


class StaticKVDecoder:
    """Decoding for LLaMA-family models with a preallocated KV cache and shared prompt prefill.

    It runs the model's own modules (embeddings, norms, projections, rotary embedding, MLP, head),
    so it always uses the current weights; only attention and the cache are its own.
    """

    MODEL_CLASSES = (LlamaForCausalLM, Qwen2ForCausalLM)

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        self.model = model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads

    @classmethod
    def supports(cls, model: torch.nn.Module) -> bool:
        """LLaMA or Qwen2 architecture with plain SiLU MLPs and full attention (no sliding window)."""
        config = getattr(model, "config", None)
        return (
            isinstance(model, cls.MODEL_CLASSES)
            and getattr(config, "hidden_act", None) == "silu"
            and not getattr(config, "use_sliding_window", False)
        )

    def _attend(
        self, q: torch.Tensor, layer: int, cache: _KVCache, end: int, bias: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Attention of `q` (rows, heads, S, head_dim) over the shared prefix and each row's first
        `end` columns.

        The query heads that share a KV head are stacked as its queries, so keys and values are read
        once, never repeated per query head; the prefix's keys and values, the same for every row,
        meet all rows' queries in one matrix product instead of being copied into every row.
        """
        rows, _, width, dim = q.shape
        queries = self.heads // self.kv_heads * width
        q = q.reshape(rows, self.kv_heads, queries, dim)
        own_keys, own_values = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]
        scores = torch.matmul(q, own_keys.transpose(-1, -2)).mul_(scale)
        scores = (scores.view(rows, self.kv_heads, -1, width, end) + bias[:, :, None]).flatten(2, 3)
        prefix = cache.prefix
        if prefix:
            stacked = q.transpose(0, 1).reshape(self.kv_heads, rows * queries, dim)
            shared = torch.matmul(stacked, cache.prefix_keys[layer].transpose(-1, -2)).mul_(scale)
            scores = torch.cat(
                [shared.view(self.kv_heads, rows, queries, prefix).transpose(0, 1), scores], -1
            )
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        out = torch.matmul(probs[..., prefix:], own_values)
        if prefix:
            weights = probs[..., :prefix].transpose(0, 1).reshape(self.kv_heads, rows * queries, prefix)
            shared_out = torch.matmul(weights, cache.prefix_values[layer])
            out = out + shared_out.view(self.kv_heads, rows, queries, dim).transpose(0, 1)
        # (rows, kv_heads, groups, S, dim) -> (rows, S, heads * dim), head h = kv_head * groups + group
        out = out.view(rows, self.kv_heads, -1, width, dim).permute(0, 3, 1, 2, 4)
        return out.reshape(rows, width, self.heads * dim)

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: _KVCache, bias: torch.Tensor
    ) -> torch.Tensor:
        """Final hidden states of `ids` (rows, S), whose keys and values fill the rows' next S columns.

        `bias` (rows, 1, S, columns written after this call) is 0 where a query may attend and the
        dtype's minimum elsewhere; the shared prefix is visible to every query.
        """
        inner = self.model.model
        rows, width = ids.shape
        start, end = cache.length, cache.length + width
        hidden = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(hidden, positions)
        for index, layer in enumerate(inner.layers):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attention.q_proj(x).view(rows, width, self.heads, self.head_dim).transpose(1, 2)
            k = attention.k_proj(x).view(rows, width, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attention.v_proj(x).view(rows, width, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            cache.keys[index][:, :, start:end] = k
            cache.values[index][:, :, start:end] = v
            out = self._attend(q, index, cache, end, bias, attention.scaling)
            hidden = hidden + attention.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        cache.length = end
        return inner.norm(hidden)

    def _logits(self, hidden: torch.Tensor, vocab: int) -> torch.Tensor:
        return self.model.lm_head(hidden[:, -1])[:, :vocab].float()

    def _prefill(self, request: DecodeRequest) -> tuple[_KVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cache, first logits, key mask of the rows' own columns, and the prompt length of every row.

        The prefix all prompts share (the chat template and system prompt) is computed and stored
        once, each distinct prompt's remainder once, and rows that repeat a prompt (the G samples
        of a group) copy its remainder. A row's own columns: [left-padded remainder | completion].
        """
        parameter = next(self.model.parameters())
        device, dtype = parameter.device, parameter.dtype
        minimum = torch.finfo(dtype).min
        layers = len(self.model.model.layers)
        distinct: dict[tuple[int, ...], int] = {}
        row_of = [distinct.setdefault(tuple(int(t) for t in p), len(distinct)) for p in request.prompts]
        uniques = [np.asarray(p, dtype=np.int64) for p in distinct]
        # The tokens every prompt shares; at least one token of each stays its own.
        head = min(len(p) for p in uniques) - 1
        same = (np.stack([p[:head] for p in uniques]) == uniques[0][:head]).all(axis=0)
        prefix = head if same.all() else int(np.argmin(same))
        width = max(len(p) for p in uniques) - prefix
        like = torch.empty(0, dtype=dtype, device=device)
        prefix_keys: list[torch.Tensor] = []
        prefix_values: list[torch.Tensor] = []
        if prefix:
            shared = _KVCache.empty(layers, (1, self.kv_heads, prefix, self.head_dim), like)
            causal = torch.ones(prefix, prefix, dtype=torch.bool, device=device).tril()
            bias = torch.zeros(1, 1, prefix, prefix, dtype=dtype, device=device).masked_fill(~causal, minimum)
            ids = torch.as_tensor(uniques[0][None, :prefix], device=device)
            self._forward(ids, torch.arange(prefix, device=device)[None], shared, bias)
            prefix_keys, prefix_values = [k[0] for k in shared.keys], [v[0] for v in shared.values]
        shape = (len(uniques), self.kv_heads, width + request.max_new_tokens, self.head_dim)
        cache = _KVCache.empty(layers, shape, like)
        cache.prefix_keys, cache.prefix_values = prefix_keys, prefix_values
        ids = torch.full((len(uniques), width), request.pad_id, dtype=torch.long)
        valid = torch.zeros((len(uniques), width), dtype=torch.bool)
        positions = torch.full((len(uniques), width), prefix, dtype=torch.long)
        for u, prompt in enumerate(uniques):
            own = len(prompt) - prefix
            ids[u, width - own :] = torch.as_tensor(prompt[prefix:])
            valid[u, width - own :] = True
            positions[u, width - own :] = torch.arange(prefix, len(prompt))
        ids, valid, positions = ids.to(device), valid.to(device), positions.to(device)
        column = torch.arange(width, device=device)
        # Causal over real tokens; a padding query attends to itself so no softmax row is empty.
        allowed = valid[:, None, :] & (column[None, :] <= column[:, None])[None] | torch.eye(
            width, dtype=torch.bool, device=device
        )
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, minimum)
        hidden = self._forward(ids, positions, cache, bias[:, None])
        logits = self._logits(hidden, request.vocab)
        rows = torch.as_tensor(row_of, device=device)
        lengths = torch.as_tensor([len(p) for p in request.prompts], device=device)
        return cache.select(rows), logits[rows], valid[rows], lengths

    @torch.no_grad()
    def decode(self, request: DecodeRequest) -> Generation:
        cache, logits, valid, next_position = self._prefill(request)
        device, dtype = logits.device, cache.keys[0].dtype
        n, limit = len(request.prompts), request.max_new_tokens
        # Additive key mask of every own column a completion will reach, sliced per step.
        bias = torch.zeros((n, 1, 1, cache.keys[0].shape[2]), dtype=dtype, device=device)
        bias[:, 0, 0, : valid.shape[1]].masked_fill_(~valid, torch.finfo(dtype).min)
        tokens_out = torch.zeros((n, limit), dtype=torch.long, device=device)
        logprobs_out = torch.zeros((n, limit), dtype=torch.float32, device=device)
        lengths = [limit] * n
        states = [request.start_state() for _ in range(n)] if request.start_state else None
        live = list(range(n))  # original row of each cache row
        running = list(range(n))  # cache rows whose completion has not stopped
        for step in range(limit):
            index = torch.as_tensor(live, device=device)
            if request.help_bias:
                logits = bias_help(logits, tokens_out[index, :step], request)
            tokens, token_logprobs = sample_tokens(
                logits, request.temperature, request.top_p, request.greedy, request.generator
            )
            tokens_out[index, step] = tokens
            logprobs_out[index, step] = token_logprobs
            host = tokens.tolist() if states is not None else [0] * len(live)
            rows = [live[j] for j in running]
            stopped = stops(states, rows, [host[j] for j in running], step, limit)
            for row, stop in zip(rows, stopped, strict=True):
                if stop:
                    lengths[row] = step + 1
            running = [j for j, stop in zip(running, stopped, strict=True) if not stop]
            if not running:
                break
            if len(running) <= COMPACT_BELOW * len(live):
                keep = torch.as_tensor(running, device=device)
                cache, bias, tokens = cache.select(keep), bias[keep], tokens[keep]
                next_position = next_position[keep]
                live = [live[j] for j in running]
                running = list(range(len(live)))
            hidden = self._forward(
                tokens[:, None], next_position[:, None], cache, bias[..., : cache.length + 1]
            )
            logits = self._logits(hidden, request.vocab)
            next_position = next_position + 1
        return to_generation(tokens_out, logprobs_out, lengths)


class HFRollout(GeneratingRollout):
    """Batched generation with a KV cache; rows stop as soon as the env's stop rules say so."""

    def help_branches(self) -> tuple[HelpBranch, ...]:
        """Where this env's completions branch into the marker: the branch token is the help action."""
        return tuple(self.env.help_branches())

    @torch.no_grad()
    def generate(
        self,
        prompts: list[np.ndarray],
        max_new_tokens: int,
        greedy: bool,
        seed: int,
        help_bias: float = 0.0,
        stop_rules: bool = True,
    ) -> Generation:
        """`stop_rules=False` decodes every row to `max_new_tokens` (benchmarks and equality tests)."""
        model = self.policy.model
        was_training = model.training
        model.eval()
        # A LoRA policy's base model calls peft's LoRA layers as its projections: the fast path fits it too.
        base = self.policy.transformers_model
        fast = StaticKVDecoder(base) if StaticKVDecoder.supports(base) else None
        completions: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        # Similar lengths pad less; the sort is stable, so the G copies of a prompt stay together.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        try:
            for start in range(0, len(order), self.config.max_batch):
                chunk = order[start : start + self.config.max_batch]
                request = DecodeRequest(
                    prompts=[prompts[i] for i in chunk],
                    max_new_tokens=max_new_tokens,
                    temperature=self.config.temperature,
                    top_p=self.config.top_p,
                    greedy=greedy,
                    generator=torch.Generator(device=self.policy.device).manual_seed(seed + start),
                    vocab=self.policy.vocab_size,
                    start_state=self.env.start_completion if stop_rules else None,
                    pad_id=int(self.policy.tokenizer.pad_token_id),
                    help_bias=help_bias,
                    help_branches=self.help_branches() if help_bias else (),
                )
                out = fast.decode(request) if fast is not None else decode_dynamic(model, request)
                for i, tokens, lps in zip(chunk, out.completions, out.logprobs, strict=True):
                    completions[i], logprobs[i] = tokens, lps
        finally:
            model.train(was_training)
        return Generation(completions, logprobs)
