"""`device=tiny-arith`: a device model that can learn on a CPU, built once per recipe and cached.

SmolLM2-135M answers almost none of the default task in the answer-tag format and never writes the
call-for-help marker, and one RL step on it costs tens of seconds on two cores. `tiny-arith` is a
small LLaMA-style model trained from scratch, in minutes, on text the task itself generates: the
exact prompt tokens of `DeviceCloud-v0` followed by a short completion in the task's answer format,
or, for a fixed fraction of targets of every level, the call-for-help marker. It ends up solving the
easy levels, part of the middle ones and none of the hard ones, and it writes the marker from the
start without having been told where to use it: what GAPG needs to learn routing (design.md §6).

The build trains a compact-vocabulary model (agents.supervised.CompactVocabulary) and expands it
into the full-vocabulary model; `python -m agents.warmup device=tiny-arith` measures it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from agents.supervised import (
    CompactVocabulary,
    SupervisedData,
    TemplateMix,
    fit,
    prompt_env,
    training_problems,
)
from collab_env.config import DeviceConfig, TaskConfig, check_range, coerce
from collab_env.errors import ConfigError, unknown_name
from collab_env.models import load_tokenizer, tiny_llama_config
from collab_env.paths import cache_dir, note
from collab_env.tasks import HELP_MARKER, TEMPLATES, Problem, Task, make_task

BUILD_VERSION = 3
"""Part of the cache key of built models: bump it when a change here changes what a recipe builds."""


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
    train_prompts: int | None = None
    """Generated training prompts to learn from (None: the task's own training split): the task
    generated with this many training prompts, less every question of its own test and validation
    splits. More distinct prompts for a task whose question space is large (running_total)."""
    trace: bool = False
    """Learn the task's worked steps (Template I with a trace, `<think>37+48=85 ...</think>`) before the
    answer, and put the marker after a random number of steps: a device that reasons, then decides
    (`device=tiny-reason`, on running_total). Needs a task that writes its steps."""
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
        if self.train_prompts is not None and self.train_prompts < 1:
            raise ConfigError(
                f"device.recipe.train_prompts={self.train_prompts} must be at least 1 (or null)."
            )


def tiny_arith_spec(device: DeviceConfig, task: TaskConfig) -> dict[str, Any]:
    """Everything a built tiny-arith model depends on; its hash names the cache directory."""
    recipe = coerce(TinyArithRecipe, device.recipe, "device.recipe")
    settings = dataclasses.asdict(recipe)
    for name in ("trace", "train_prompts"):
        if not settings[name]:
            del settings[name]  # models built before the field existed keep their cache key
    return {
        "version": BUILD_VERSION,
        "recipe": settings,
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
    spec = tiny_arith_spec(device, task)
    recipe = coerce(TinyArithRecipe, device.recipe, "device.recipe")
    started, cpu_started = time.perf_counter(), time.process_time()
    tokenizer_device = DeviceConfig(name="smollm2")  # SmolLM2's tokenizer keeps the env's defaults
    pool = task if recipe.train_prompts is None else dataclasses.replace(task, num_train=recipe.train_prompts)
    envs = [
        prompt_env(dataclasses.replace(pool, template=name), tokenizer_device)
        for name in _templates(task, recipe)
    ]
    problems = training_problems(envs[0].unwrapped.task, recipe.levels, "device.recipe.levels")
    if recipe.train_prompts is not None:
        problems = _without_held_out(problems, make_task(task))
    data = TemplateMix([SupervisedData(env, problems, recipe.marker_fraction, recipe.trace) for env in envs])
    tokenizer = load_tokenizer(tokenizer_device)
    vocabulary = CompactVocabulary.of(data.token_ids(), data.vocab_size)
    torch.manual_seed(device.seed)
    compact = AutoModelForCausalLM.from_config(
        tiny_llama_config(device, len(vocabulary.ids), vocabulary.special_tokens(tokenizer))
    )
    note(f"building device=tiny-arith into {target} (once per recipe; a few minutes on 2 cores)")
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
    note(f"built tiny-arith in {record['build']['seconds']:.0f} s, final loss {losses[-1]:.3f}")
    return record


def _without_held_out(problems: list[Problem], task: Task) -> list[Problem]:
    """`problems` less every question of `task`'s test and validation splits."""
    held_out = {task.equivalence_key(p) for split in ("test", "validation") for p in task.problems(split)}
    return [p for p in problems if task.equivalence_key(p) not in held_out]


def _publish(tmp: Path, final: Path) -> None:
    """Move a complete directory into place; a concurrent build that finished first wins."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "recipe.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def parameter_counts(model: Any) -> tuple[int, int]:
    """Total and non-embedding parameters (tied embeddings counted once)."""
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()
