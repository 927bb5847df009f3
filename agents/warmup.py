"""Measure a device model: `python -m agents.warmup device=tiny-arith | device=smollm2 +warmup=format_sft`.

With `device=tiny-arith` it builds (or finds) the model and prints its accuracy and help rate per
level next to SmolLM2's generation speed; with `+warmup=format_sft` it measures the device before and
after the format warm-up (docs/device_models.md). Nothing imports this module.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from agents.config import FormatWarmupConfig, RolloutConfig
from agents.evaluation import evaluate_policy
from agents.metrics import summarize
from agents.policy import Policy
from agents.registry import register_configs, to_objects
from agents.rollout import make_rollout
from agents.rollout.hf import HFRollout
from agents.runs import make_eval_env
from agents.supervised import format_warmup, prompt_env
from agents.tiny_arith import ensure_tiny_arith, parameter_counts
from collab_env.config import DeviceConfig, coerce
from collab_env.errors import ConfigError

register_configs()


def measure_levels(
    policy: Any, run: Any, prompt_ids: list[int], sampled: bool = True
) -> dict[str, dict[str, float]]:
    """summarize() of greedy completions (the held-out protocol) and, with `sampled`, of completions
    sampled at temperature 1 (what RL explores): local accuracy and help rate per level."""
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


def _report_tiny_arith(run: Any) -> None:
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


if __name__ == "__main__":
    main()
