"""Device models that can learn on a CPU (`device=tiny-arith`) and the optional format warm-up.

SmolLM2-135M answers almost none of the default task in the answer-tag format and never writes the
call-for-help marker, and one RL step on it costs tens of seconds on two cores. `tiny-arith` is a
small LLaMA-style model trained from scratch, in minutes, on text the task itself generates: the
exact prompt tokens of `DeviceCloud-v0` followed by a short completion in the task's answer format,
or, for a fixed fraction of targets of every level, the call-for-help marker. It ends up solving the
easy levels, part of the middle ones and none of the hard ones, and it writes the marker from the
start without having been told where to use it: what GAPG needs to learn routing (design.md §6).

`format_warmup` (`warmup=format_sft`, off by default as in the paper) is a short supervised pass
that teaches an instruct model such as SmolLM2 the answer format and that the marker exists.

Both train on completion tokens only, and both exploit that every prompt of a task starts with the
same system prompt: that shared prefix goes through the model once per batch, its key/value cache is
repeated for every row, and only the varying rest of each prompt and its completion are computed.

`python -m agents.warmup device=tiny-arith task=arithmetic` builds (or finds) the model and prints
its accuracy and help rate per level next to SmolLM2's generation speed; `python -m agents.warmup
device=smollm2 +warmup=format_sft` measures SmolLM2 before and after the warm-up (docs/device_models.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm
from transformers import DynamicCache

import collab_env  # noqa: F401  (registers DeviceCloud-v0)
from collab_env.config import DeviceConfig, TaskConfig, check_range, coerce
from collab_env.errors import ConfigError, unknown_name
from collab_env.models import load_tokenizer, tiny_llama_config
from collab_env.paths import cache_dir
from collab_env.tasks import HELP_MARKER, TEMPLATES, Problem

BUILD_VERSION = 2
"""Part of the cache key of built models: bump it when a change here changes what a recipe builds."""

_WARMUP_FRACTION = 0.05
"""Share of the steps over which the learning rate rises linearly (from-scratch training diverges
at full rate while the attention is still uniform)."""
_FINAL_LR_FRACTION = 0.1
"""The cosine schedule ends at this fraction of the peak rate rather than at zero."""
_MAX_GRAD_NORM = 1.0


@dataclass
class TinyArithRecipe:
    """How `device=tiny-arith` is trained from scratch; the `device.recipe` dict is checked against it."""

    levels: list[str] | None = field(default_factory=lambda: ["add2", "add2_carry", "add3", "mul21"])
    """Task levels whose training prompts it learns from (None: every level). Leaving the hardest
    level out keeps it near zero, so competence spreads from near-perfect to nothing."""
    steps: int = 1500
    """Optimizer steps (the build time is proportional)."""
    batch_size: int = 32
    """Examples per step, drawn uniformly (with replacement) from the training prompts of `levels`."""
    lr: float = 3e-3
    """Peak AdamW learning rate: linear warm-up over the first 5% of steps, then cosine decay to 10%."""
    marker_fraction: float = 0.1
    """Share of targets of every level that are the call-for-help marker instead of the answer, drawn
    per example: the help action is explored from the start, but nothing says where it pays off.
    Templates without the help option (plain) get no markers."""
    seed: int = 0
    """Seed of the example draws (the initial weights use device.seed)."""
    extra_templates: list[str] = field(default_factory=lambda: ["plain"])
    """Prompt templates it also learns from, besides the task's own; each step draws its batch from one
    of them in turn. The task-tuning baselines prompt with `plain` (no help option), and a model this
    small does not carry what it learnt under one system prompt over to another."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.extra_templates) - set(TEMPLATES))
        if unknown:
            raise unknown_name("template", unknown[0], TEMPLATES, field="device.recipe.extra_templates")
        if self.levels is not None and not self.levels:
            raise ConfigError(
                "device.recipe.levels=[] trains on nothing: list some levels or use null for all."
            )
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"device.recipe.{name}={getattr(self, name)} must be at least 1.")
        if self.lr <= 0:
            raise ConfigError(f"device.recipe.lr={self.lr} must be positive.")
        check_range("device.recipe.marker_fraction", self.marker_fraction, 0.0, 1.0)


@dataclass
class FormatWarmupConfig:
    """`warmup=format_sft`: a short supervised pass before RL that teaches a pretrained instruct model
    the answer format and the call-for-help marker (off by default, as in the paper)."""

    name: str = "format_sft"
    steps: int = 30
    """Optimizer steps."""
    batch_size: int = 8
    """Generated training examples per step."""
    lr: float = 3e-5
    """Peak AdamW learning rate (same schedule as tiny-arith). It trains every parameter, or only the
    LoRA adapters when train.lora_rank > 0."""
    marker_fraction: float = 0.1
    """Share of targets of every level that are the call-for-help marker instead of the answer."""
    levels: list[str] | None = None
    """Task levels to draw examples from (None: every level)."""
    seed: int = 0
    """Seed of the example draws."""

    def __post_init__(self) -> None:
        if self.name != "format_sft":
            raise ConfigError(f"warmup.name={self.name!r}; the only warm-up is format_sft (or warmup=null).")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"warmup.{name}={getattr(self, name)} must be at least 1.")
        if self.lr <= 0:
            raise ConfigError(f"warmup.lr={self.lr} must be positive.")
        if self.levels is not None and not self.levels:
            raise ConfigError("warmup.levels=[] trains on nothing: list some levels or use null for all.")
        check_range("warmup.marker_fraction", self.marker_fraction, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Supervised examples in the environment's own prompt format


def prompt_env(task: TaskConfig, device: DeviceConfig, max_prompt_tokens: int = 256) -> gym.Env:
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

    def __init__(self, env: gym.Env, problems: list[Problem], marker_fraction: float) -> None:
        unwrapped = env.unwrapped
        tokenizer = unwrapped.tokenizer
        template = unwrapped.task.template
        prompts = [unwrapped.prompt_tokens(p.id).tolist() for p in problems]
        shared = _common_prefix_len(prompts)
        self.prefix = prompts[0][:shared]
        self.tails = [prompt[shared:] for prompt in prompts]
        eos = [int(tokenizer.eos_token_id)]
        encode = tokenizer.encode
        self.answers = [
            encode(template.render_answer(p.answer), add_special_tokens=False) + eos for p in problems
        ]
        self.marker = encode(HELP_MARKER, add_special_tokens=False) + eos
        self.marker_fraction = marker_fraction if template.allows_help else 0.0
        self.levels = [p.level for p in problems]
        self.pad_id = int(tokenizer.pad_token_id)
        self.vocab_size = len(tokenizer)

    def token_ids(self) -> list[int]:
        """Every token id these examples contain (padding included), sorted."""
        used = {self.pad_id, *self.prefix, *self.marker}
        for rows in (self.tails, self.answers):
            for row in rows:
                used.update(row)
        return sorted(used)

    def draw(self, size: int, rng: np.random.Generator) -> Batch:
        """`size` examples drawn with replacement; each target is the marker with prob. marker_fraction."""
        picks = rng.integers(len(self.tails), size=size)
        markers = rng.random(size) < self.marker_fraction
        completions = [self.marker if m else self.answers[i] for i, m in zip(picks, markers, strict=True)]
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
        from transformers import AutoModelForCausalLM

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
) -> list[float]:
    """Supervised training on completions (AdamW, warm-up then cosine); returns the loss of every step.

    With `vocabulary`, `model` is the compact model of a from-scratch build.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
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
    model.train(was_training)
    return losses


# ---------------------------------------------------------------------------------------------------
# device=tiny-arith: built once per recipe, cached in the user cache directory


def tiny_arith_spec(device: DeviceConfig, task: TaskConfig) -> dict[str, Any]:
    """Everything a built tiny-arith model depends on; its hash names the cache directory."""
    recipe = coerce(TinyArithRecipe, device.recipe, "device.recipe")
    return {
        "version": BUILD_VERSION,
        "recipe": dataclasses.asdict(recipe),
        "architecture": {
            "hidden_size": device.hidden_size,
            "num_layers": device.num_layers,
            "num_heads": device.num_heads,
            "intermediate_size": device.intermediate_size,
            "seed": device.seed,
        },
        # Every task setting: num_test too, since arithmetic draws its test prompts before its training ones.
        "task": dataclasses.asdict(task),
        "templates": [
            {
                "messages": TEMPLATES[name].messages("{question}", task.max_steps),
                "answer": TEMPLATES[name].render_answer("{answer}"),
                "marker": HELP_MARKER,
            }
            for name in _templates(task, recipe)
        ],
    }


def _templates(task: TaskConfig, recipe: TinyArithRecipe) -> list[str]:
    """The task's own template, then the recipe's extra ones (each once)."""
    return list(dict.fromkeys([task.template, *recipe.extra_templates]))


def tiny_arith_dir(device: DeviceConfig, task: TaskConfig) -> Path:
    """The cache directory of the tiny-arith model that `device` and `task` describe."""
    spec = json.dumps(tiny_arith_spec(device, task), sort_keys=True)
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"tiny-arith-{key}"


def ensure_tiny_arith(device: DeviceConfig, task: TaskConfig) -> DeviceConfig:
    """`device` pointing at its built tiny-arith model: found in the cache, or built there first."""
    target = tiny_arith_dir(device, task)
    if not (target / "recipe.json").is_file():
        build_tiny_arith(device, task, target)
    return dataclasses.replace(device, name="tiny-arith", path=str(target))


def build_tiny_arith(device: DeviceConfig, task: TaskConfig, target: Path) -> dict[str, Any]:
    """Train the model from scratch and publish it (weights, tokenizer, recipe.json) at `target`."""
    from transformers import AutoModelForCausalLM

    spec = tiny_arith_spec(device, task)
    recipe = TinyArithRecipe(**spec["recipe"])
    started, cpu_started = time.perf_counter(), time.process_time()
    tokenizer_device = DeviceConfig(name="smollm2")  # SmolLM2's tokenizer keeps the env's defaults
    envs = [
        prompt_env(dataclasses.replace(task, template=name), tokenizer_device)
        for name in _templates(task, recipe)
    ]
    problems = training_problems(envs[0].unwrapped.task, recipe.levels, "device.recipe.levels")
    data = TemplateMix([SupervisedData(env, problems, recipe.marker_fraction) for env in envs])
    tokenizer = load_tokenizer(tokenizer_device)
    vocabulary = CompactVocabulary.of(data.token_ids(), data.vocab_size)
    torch.manual_seed(device.seed)
    compact = AutoModelForCausalLM.from_config(
        tiny_llama_config(device, len(vocabulary.ids), vocabulary.special_tokens(tokenizer))
    )
    _note(f"building device=tiny-arith into {target} (once per recipe; a few minutes on 2 cores)")
    losses = fit(
        compact, data, recipe.steps, recipe.batch_size, recipe.lr, recipe.seed, vocabulary, "tiny-arith"
    )
    model = vocabulary.expand(compact, tiny_llama_config(device, len(tokenizer), tokenizer))
    total, non_embedding = parameter_counts(model)
    record = {
        **spec,
        "build": {
            "seconds": round(time.perf_counter() - started, 1),
            # CPU seconds of this process: on a shared machine they vary less than the wall time.
            "cpu_seconds": round(time.process_time() - cpu_started, 1),
            "torch_threads": torch.get_num_threads(),
            "cpu": torch.backends.cpu.get_cpu_capability(),
            "parameters": total,
            "non_embedding_parameters": non_embedding,
            "training_prompts": len(problems),
            "losses": [round(loss, 5) for loss in losses],
        },
    }
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    # recipe.json is written last: its presence marks a complete directory.
    (tmp / "recipe.json").write_text(json.dumps(record, indent=1))
    _publish(tmp, target)
    for env in envs:
        env.close()
    _note(f"built tiny-arith in {record['build']['seconds']:.0f} s, final loss {losses[-1]:.3f}")
    return record


def _publish(tmp: Path, final: Path) -> None:
    """Move a complete directory into place; a concurrent build that finished first wins."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "recipe.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _note(message: str) -> None:
    print(f"[devicecloud] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# warmup=format_sft


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
        policy.model, data, config.steps, config.batch_size, config.lr, config.seed, desc="format warm-up"
    )
    env.close()
    return losses


# ---------------------------------------------------------------------------------------------------
# Measurement: python -m agents.warmup device=tiny-arith | device=smollm2 +warmup=format_sft


def measure_levels(
    policy: Any, run: Any, prompt_ids: list[int], sampled: bool = True
) -> dict[str, dict[str, float]]:
    """summarize() of greedy completions (the held-out protocol) and, with `sampled`, of completions
    sampled at temperature 1 (what RL explores): local accuracy and help rate per level."""
    from agents.config import RolloutConfig
    from agents.evaluation import evaluate_policy, make_eval_env, summarize
    from agents.rollout import make_rollout

    env = make_eval_env(run, len(prompt_ids))
    out = {
        "greedy": summarize(
            evaluate_policy(policy, env, prompt_ids, run.rollout, run.evaluate.max_batch).infos
        )
    }
    if sampled:
        sampler = RolloutConfig(backend="hf", temperature=1.0, max_batch=run.evaluate.max_batch)
        env.unwrapped.budget.reset_window()
        out["sampled"] = summarize(make_rollout(policy, env, sampler, run.seed).rollout(prompt_ids, 1).infos)
    env.close()
    return out


def generation_speed(policy: Any, run: Any, prompt_ids: list[int]) -> dict[str, float]:
    """Greedy tokens/s of the hf backend on `prompt_ids` in one batch, up to env.max_new_tokens each."""
    from agents.config import RolloutConfig
    from agents.rollout.hf import HFRollout

    env = prompt_env(run.task, run.device, run.env.max_prompt_tokens)
    engine = HFRollout(policy, env, RolloutConfig(backend="hf", max_batch=len(prompt_ids)))
    prompts = [env.unwrapped.prompt_tokens(pid) for pid in prompt_ids]
    started = time.perf_counter()
    generation = engine.generate(prompts, run.env.max_new_tokens, greedy=True, seed=run.seed)
    seconds = time.perf_counter() - started
    tokens = sum(len(c) for c in generation.completions)
    env.close()
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds}


def level_table(columns: list[tuple[str, dict[str, float], str]], levels: list[str]) -> str:
    """A markdown table, one row per level and one for all: columns are (title, summarize() output, metric)."""
    lines = [
        "| level | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for level in [*levels, "all"]:
        key = "" if level == "all" else f"/{level}"
        cells = [f"{metrics[metric + key]:.1%}" for _, metrics, metric in columns]
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parameter_counts(model: Any) -> tuple[int, int]:
    """Total and non-embedding parameters (tied embeddings counted once)."""
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def _report_tiny_arith(run: Any) -> None:
    from agents.policy import Policy

    started = time.perf_counter()
    device = ensure_tiny_arith(run.device, run.task)
    found = time.perf_counter() - started
    run = dataclasses.replace(run, device=device)
    build = json.loads((Path(device.path) / "recipe.json").read_text())["build"]
    policy = Policy.load(device)
    prompts, levels = _test_prompts(run)
    measured = measure_levels(policy, run, prompts)
    speed_prompts = prompts[: run.evaluate.max_batch]
    speed = generation_speed(policy, run, speed_prompts)
    smollm2 = dataclasses.replace(run, device=DeviceConfig(name="smollm2"))
    reference = generation_speed(Policy.load(smollm2.device), smollm2, speed_prompts)
    total, non_embedding = parameter_counts(policy.model)
    print(f"\n## tiny-arith ({device.path})\n")
    greedy, sampled = measured["greedy"], measured["sampled"]
    columns = [
        ("local accuracy (greedy)", greedy, "local_accuracy"),
        ("help rate (greedy)", greedy, "help_rate"),
        ("local accuracy (T=1)", sampled, "local_accuracy"),
        ("help rate (T=1)", sampled, "help_rate"),
    ]
    print(level_table(columns, levels))
    print(
        f"\n- held-out prompts: {len(prompts)} ({run.evaluate.split} split)"
        f"\n- build: {build['seconds']:.0f} s ({build['cpu_seconds']:.0f} CPU s) with {build['torch_threads']} "
        f"threads ({build['cpu']}); "
        f"this call took {found:.0f} s to build or find it"
        f"\n- parameters: {total / 1e6:.2f}M, of which {non_embedding / 1e6:.2f}M non-embedding"
        f"\n- greedy generation, batch {len(speed_prompts)}, at most {run.env.max_new_tokens} new tokens: "
        f"tiny-arith {speed['tokens_per_s']:.0f} tok/s ({speed['tokens']} tokens), "
        f"SmolLM2 {reference['tokens_per_s']:.0f} tok/s ({reference['tokens']} tokens): "
        f"{speed['tokens_per_s'] / reference['tokens_per_s']:.1f}x"
    )


def _report_format_warmup(run: Any) -> None:
    from agents.policy import Policy

    config = coerce(FormatWarmupConfig, run.warmup, "warmup")
    policy = Policy.load(run.device, lora_rank=run.train.lora_rank)
    prompts, levels = _test_prompts(run)
    speed_prompts = prompts[: run.evaluate.max_batch]
    before = measure_levels(policy, run, prompts, sampled=False)["greedy"]
    speed_before = generation_speed(policy, run, speed_prompts)
    started = time.perf_counter()
    losses = format_warmup(policy, run)
    seconds = time.perf_counter() - started
    after = measure_levels(policy, run, prompts)
    speed_after = generation_speed(policy, run, speed_prompts)
    print(f"\n## {run.device.name} before and after warmup=format_sft\n")
    columns = [
        ("local accuracy before", before, "local_accuracy"),
        ("help rate before", before, "help_rate"),
        ("local accuracy after", after["greedy"], "local_accuracy"),
        ("help rate after", after["greedy"], "help_rate"),
        ("help rate after (T=1)", after["sampled"], "help_rate"),
    ]
    print(level_table(columns, levels))
    print(
        f"\n- held-out prompts: {len(prompts)} ({run.evaluate.split} split)"
        f"\n- warm-up: {config.steps} steps x {config.batch_size} examples in {seconds:.0f} s "
        f"({seconds / config.steps:.1f} s/step, {torch.get_num_threads()} threads), "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        f"\n- greedy generation, batch {len(speed_prompts)}, at most {run.env.max_new_tokens} new tokens: "
        f"before {speed_before['tokens_per_s']:.0f} tok/s ({speed_before['tokens']} tokens), "
        f"after {speed_after['tokens_per_s']:.0f} tok/s ({speed_after['tokens']} tokens)"
    )


def _test_prompts(run: Any) -> tuple[list[int], list[str]]:
    """The held-out prompt ids measured (evaluate.split, evaluate.num_prompts) and their levels in order."""
    env = prompt_env(run.task, run.device, run.env.max_prompt_tokens)
    task = env.unwrapped.task
    problems = task.problems(run.evaluate.split)[: run.evaluate.num_prompts or None]
    env.close()
    return [p.id for p in problems], list(dict.fromkeys(p.level for p in problems))


def _main() -> None:
    import hydra
    from omegaconf import DictConfig

    import agents.gapg  # noqa: F401  (registers the agents the train config names)
    import agents.grpo  # noqa: F401
    import agents.ppo  # noqa: F401
    from agents.config import register_configs, to_objects

    register_configs()

    @hydra.main(version_base=None, config_path="../configs", config_name="train")
    def main(cfg: DictConfig) -> None:
        run = to_objects(cfg)
        torch.manual_seed(run.seed)
        if run.warmup is not None:
            _report_format_warmup(run)
        elif run.device.name == "tiny-arith" and not run.device.path:
            _report_tiny_arith(run)
        else:
            raise ConfigError(
                "python -m agents.warmup measures device=tiny-arith (built or found in the cache) or the "
                "format warm-up of another device (+warmup=format_sft)."
            )

    main()


if __name__ == "__main__":
    _main()
