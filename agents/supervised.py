"""Supervised training on completions in the environment's own prompt format.

The machinery under both device recipes: the `tiny-arith` build (agents.tiny_arith) and the optional
format warm-up (`warmup=format_sft`, off by default as in the paper), a short supervised pass that
teaches an instruct model such as SmolLM2 the answer format and that the call-for-help marker exists.

Both train on completion tokens only, and both exploit that every prompt of a task starts with the
same system prompt: that shared prefix goes through the model once per batch, its key/value cache is
repeated for every row, and only the varying rest of each prompt and its completion are computed.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, DynamicCache

import collab_env  # noqa: F401  (registers DeviceCloud-v0)
from agents.config import FormatWarmupConfig
from agents.precision import adamw, stepped_parameters
from collab_env.config import DeviceConfig, EnvConfig, TaskConfig, coerce
from collab_env.errors import ConfigError
from collab_env.tasks import HELP_MARKER, Problem
from collab_env.tasks.templates import render_help_after, render_trace

_WARMUP_FRACTION = 0.05
"""Share of the steps over which the learning rate rises linearly (from-scratch training diverges
at full rate while the attention is still uniform)."""
_FINAL_LR_FRACTION = 0.1
"""The cosine schedule ends at this fraction of the peak rate rather than at zero."""
_MAX_GRAD_NORM = 1.0


def prompt_env(
    task: TaskConfig, device: DeviceConfig, max_prompt_tokens: int = EnvConfig.max_prompt_tokens
) -> gym.Env:
    """DeviceCloud-v0 used only for its prompts and scoring (an in-memory simulated cloud)."""
    return gym.make(
        "DeviceCloud-v0",
        task=task,
        device=device,
        cloud={"name": "simulated", "cache_path": ":memory:"},
        max_prompt_tokens=max_prompt_tokens,
    )


def training_problems(task: Any, levels: list[str] | None, where: str) -> list[Problem]:
    """The training-split problems of `levels` (all levels when None); unknown levels name `where`."""
    if levels is not None:
        unknown = sorted(set(levels) - set(task.levels))
        if unknown:
            raise ConfigError(
                f"{where}={levels}: task {task.name!r} has no level(s) {unknown}; its levels are "
                f"{task.levels}. Pick some of them, or set {where}=null to train on all."
            )
    return [p for p in task.problems("train") if levels is None or p.level in levels]


@dataclass
class Batch:
    """Rows of [varying prompt tail | completion | padding] that follow the shared prompt `prefix`."""

    prefix: torch.Tensor
    """(P,) the start every prompt shares."""
    input_ids: torch.Tensor
    """(B, S) token ids, right-padded."""
    labels: torch.Tensor
    """(B, S) at position t the completion token t+1, or -100 where nothing is predicted."""
    levels: list[str]
    markers: list[bool]
    """Whether each row's target is the call-for-help marker."""


class SupervisedData:
    """Prompts of a task as the env tokenizes them, their answers in the template's format, the marker.

    Every prompt starts with the same system prompt and chat header: that shared prefix is computed
    once per batch, so a row holds only the question, the prompt's end and the completion.
    """

    def __init__(
        self, env: gym.Env, problems: list[Problem], marker_fraction: float, trace: bool = False
    ) -> None:
        unwrapped = env.unwrapped
        tokenizer = unwrapped.tokenizer
        task = unwrapped.task
        template = task.template
        prompts = [unwrapped.prompt_tokens(p.id).tolist() for p in problems]
        shared = _common_prefix_len(prompts)
        self.prefix = prompts[0][:shared]
        self.tails = [prompt[shared:] for prompt in prompts]
        eos = [int(tokenizer.eos_token_id)]

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False) + eos

        steps = [task.worked_steps(p) if trace else [] for p in problems]
        if trace and not all(steps):
            raise ConfigError(
                f"device.recipe.trace=true needs worked solutions, and task {task.name!r} has none for some "
                "prompts: use a task that writes its steps (running_total) or device.recipe.trace=false."
            )
        self.answers = [
            encode((render_trace(s) if trace else "") + template.render_answer(p.answer))
            for p, s in zip(problems, steps, strict=True)
        ]
        # With a trace the marker comes after the first k steps, k uniform over 0..all: the help action
        # is explored at every point of the attempt, and nothing says where it pays off.
        self.markers = [
            [encode(render_help_after(s[:k])) for k in range(len(s) + 1)] if trace else [encode(HELP_MARKER)]
            for s in steps
        ]
        self.trace = trace
        self.marker_fraction = marker_fraction if template.allows_help else 0.0
        self.levels = [p.level for p in problems]
        self.pad_id = int(tokenizer.pad_token_id)
        self.vocab_size = len(tokenizer)

    def token_ids(self) -> list[int]:
        """Every token id these examples contain (padding included), sorted."""
        used = {self.pad_id, *self.prefix}
        for rows in (self.tails, self.answers, *self.markers):
            for row in rows:
                used.update(row)
        return sorted(used)

    def draw(self, size: int, rng: np.random.Generator) -> Batch:
        """`size` examples drawn with replacement; each target is the marker with prob. marker_fraction."""
        picks = rng.integers(len(self.tails), size=size)
        markers = rng.random(size) < self.marker_fraction
        # Drawn only with a trace, so trace-free builds keep the example stream (and cache key) they had.
        where = rng.random(size) if self.trace else np.zeros(size)
        completions = [
            self.markers[i][int(w * len(self.markers[i]))] if m else self.answers[i]
            for i, m, w in zip(picks, markers, where, strict=True)
        ]
        rows = [self.tails[i] + c for i, c in zip(picks, completions, strict=True)]
        width = max(len(row) for row in rows)
        input_ids = torch.full((size, width), self.pad_id, dtype=torch.long)
        labels = torch.full((size, width), -100, dtype=torch.long)
        for r, (row, completion) in enumerate(zip(rows, completions, strict=True)):
            input_ids[r, : len(row)] = torch.tensor(row)
            start = len(row) - len(completion)
            labels[r, start - 1 : len(row) - 1] = input_ids[r, start : len(row)]
        prefix = torch.tensor(self.prefix, dtype=torch.long)
        return Batch(prefix, input_ids, labels, [self.levels[i] for i in picks], markers.tolist())


class TemplateMix:
    """Examples of the same problems under several prompt templates; a batch comes from one of them
    (each template has its own shared prefix), the templates taking turns step by step."""

    def __init__(self, sources: list[SupervisedData]) -> None:
        self.sources = sources
        self.vocab_size = sources[0].vocab_size
        self._turn = 0

    def token_ids(self) -> list[int]:
        return sorted(set().union(*(source.token_ids() for source in self.sources)))

    def draw(self, size: int, rng: np.random.Generator) -> Batch:
        source = self.sources[self._turn % len(self.sources)]
        self._turn += 1
        return source.draw(size, rng)


def _common_prefix_len(prompts: list[list[int]]) -> int:
    """Length of the start all prompts share, leaving at least one token of each prompt to its row."""
    first = prompts[0]
    limit = min(len(p) for p in prompts) - 1
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


@dataclass
class CompactVocabulary:
    """The token ids a from-scratch model is trained on; the built model gets a zero embedding row
    for every other id of the 49k vocabulary.

    With tied embeddings a zero row is a zero input embedding and a logit of exactly 0 whatever the
    hidden state. So the built model's full softmax is log(sum over used ids of e^logit + number of
    zero rows): training a model whose vocabulary is the used ids alone, with that constant in its
    softmax, is exact and spares the 49k-row head, its gradient and its optimizer state.
    """

    ids: torch.Tensor
    """(U,) the used token ids, sorted; compact id k is token ids[k]."""
    index: torch.Tensor
    """(V,) compact id of each token id (-1 for the zero rows)."""

    @classmethod
    def of(cls, token_ids: list[int], vocab_size: int) -> CompactVocabulary:
        ids = torch.tensor(token_ids, dtype=torch.long)
        index = torch.full((vocab_size,), -1, dtype=torch.long)
        index[ids] = torch.arange(len(ids))
        return cls(ids, index)

    @property
    def log_zero_rows(self) -> float:
        """log of the number of zero rows: their combined e^0 mass in the softmax, in log space."""
        return math.log(len(self.index) - len(self.ids))

    def special_tokens(self, tokenizer: Any) -> SimpleNamespace:
        """The tokenizer's bos, eos and pad ids as compact ids (the padding row stays untrained, as in the
        full model)."""
        ids = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return SimpleNamespace(**{name: None if i is None else int(self.index[i]) for name, i in ids.items()})

    def compact(self, batch: Batch) -> Batch:
        labels = torch.where(batch.labels == -100, batch.labels, self.index[batch.labels.clamp(min=0)])
        return dataclasses.replace(
            batch, prefix=self.index[batch.prefix], input_ids=self.index[batch.input_ids], labels=labels
        )

    def expand(self, model: Any, config: Any) -> Any:
        """The model with the full vocabulary of `config`: trained rows at their token ids, zeros elsewhere."""
        full = AutoModelForCausalLM.from_config(config)
        trained = model.get_input_embeddings().weight
        # Both names of the tied embedding point at the same tensor; it is filled in below.
        state = {k: v for k, v in model.state_dict().items() if v.data_ptr() != trained.data_ptr()}
        full.load_state_dict(state, strict=False)
        with torch.no_grad():
            weight = full.get_input_embeddings().weight
            weight.zero_()
            weight[self.ids] = trained
        return full


def completion_loss(model: Any, batch: Batch, log_zero_rows: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of the completion tokens of `batch` after its shared prefix.

    The LM head runs only on positions that predict a completion token. `log_zero_rows` adds the
    constant softmax column of a compact vocabulary (CompactVocabulary).
    """
    decoder = model.get_decoder()
    cache = DynamicCache()
    decoder(input_ids=batch.prefix[None], past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(len(batch.input_ids))
    hidden = decoder(input_ids=batch.input_ids, past_key_values=cache, use_cache=True).last_hidden_state
    predicts = batch.labels != -100
    logits = model.get_output_embeddings()(hidden[predicts]).float()
    if log_zero_rows is not None:
        logits = torch.cat([logits, logits.new_full((len(logits), 1), log_zero_rows)], dim=1)
    return torch.nn.functional.cross_entropy(logits, batch.labels[predicts])


def fit(
    model: Any,
    data: SupervisedData | TemplateMix,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    vocabulary: CompactVocabulary | None = None,
    desc: str = "warm-up",
    master_weights: bool = True,
) -> list[float]:
    """Supervised training on completions (AdamW, warm-up then cosine); returns the loss of every step.

    With `vocabulary`, `model` is the compact model of a from-scratch build. A bf16 model trains on
    fp32 master weights unless `master_weights` is off (`agents/precision.py`).
    """
    optimizer, master = adamw(model, lr, (0.9, 0.98), 0.0, master_weights)
    params = stepped_parameters(optimizer)
    warmup = max(1, round(_WARMUP_FRACTION * steps))

    def schedule(step: int) -> float:
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / steps)))
        return min(1.0, (step + 1) / warmup) * (_FINAL_LR_FRACTION + (1.0 - _FINAL_LR_FRACTION) * cosine)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = np.random.default_rng(seed)
    log_zero_rows = None if vocabulary is None else vocabulary.log_zero_rows
    losses: list[float] = []
    was_training = model.training
    # Eval mode: no dropout, and gradient checkpointing (which would drop the prefix cache) stays off.
    model.eval()
    bar = tqdm(range(steps), desc=desc, mininterval=0.5 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    for _ in bar:
        batch = data.draw(batch_size, rng)
        if vocabulary is not None:
            batch = vocabulary.compact(batch)
        loss = completion_loss(model, batch, log_zero_rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, _MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    if master is not None:
        master.release()
    model.train(was_training)
    return losses


def format_warmup(policy: Any, run: Any) -> list[float]:
    """Teach `policy` the answer format and the marker on generated training examples (`run.warmup`).

    Trains every parameter of the policy's model, or only its LoRA adapters when train.lora_rank > 0.
    Returns the loss of every step.
    """
    config = coerce(FormatWarmupConfig, run.warmup, "warmup")
    env = prompt_env(run.task, run.device, run.env.max_prompt_tokens)
    problems = training_problems(env.unwrapped.task, config.levels, "warmup.levels")
    data = SupervisedData(env, problems, config.marker_fraction)
    losses = fit(
        policy.model,
        data,
        config.steps,
        config.batch_size,
        config.lr,
        config.seed,
        desc="format warm-up",
        master_weights=run.train.master_weights,
    )
    env.close()
    return losses
