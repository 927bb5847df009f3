"""The training loop every algorithm shares: sample prompts, roll out G completions each, score them
in the environment, let the algorithm prepare its batch, update, log, evaluate, checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

import collab_env  # noqa: F401  (registers DeviceCloud-v0)
from agents import distributed
from agents.algorithm import make_algorithm, score_batch, single_update, update
from agents.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from agents.config import RunConfig
from agents.evaluation import EvalResult, evaluate_policy, make_eval_env
from agents.policy import Policy, pick_device
from agents.rollout import Rollout, make_rollout
from agents.run_log import RunLog
from collab_env.config import BudgetConfig, DeviceConfig

RESUME_MUST_MATCH = ("agent", "task", "device", "env", "train.group_size", "train.prompts_per_step", "seed")
EVALUATE_MUST_MATCH = (*RESUME_MUST_MATCH, "train.lr", "rollout.temperature")
"""A finished run is reused by `agents.evaluate` only if trained with these settings of the config."""


def resolve_device(run: RunConfig) -> DeviceConfig:
    """The device config to load: models built locally (tiny-arith) are built or found in the cache first."""
    if run.device.name == "tiny-arith" and not run.device.path:
        from agents.warmup import ensure_tiny_arith

        return ensure_tiny_arith(run.device, run.task)
    return run.device


def env_arguments(run: RunConfig, budget: BudgetConfig | None = None, split: str = "train") -> dict[str, Any]:
    """The arguments every environment of a run takes (token env and routing env alike)."""
    return {
        "task": run.task,
        "device": run.device,
        "cloud": run.cloud,
        "budget": budget or run.budget,
        "reward": run.env.reward,
        "max_new_tokens": run.env.max_new_tokens,
        "max_prompt_tokens": run.env.max_prompt_tokens,
        "marker_match": run.env.marker_match,
        "split": split,
    }


def make_train_env(run: RunConfig, budget: BudgetConfig | None = None, split: str = "train") -> gym.Env:
    return gym.make("DeviceCloud-v0", **env_arguments(run, budget, split))


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """`env/` metrics of a scored batch: reward, outcome fractions, help rate (overall and per task
    level, which shows whether the device learns *where* to call), completion length."""
    n = len(rollout.infos)
    outcomes = [info["outcome"] for info in rollout.infos]
    metrics = {
        "env/reward": float(rollout.rewards.mean()),
        "env/local_correct": outcomes.count("local_correct") / n,
        "env/cloud_correct": outcomes.count("cloud_correct") / n,
        "env/wrong": outcomes.count("wrong") / n,
        "env/help_rate": sum(info["called_help"] for info in rollout.infos) / n,
        "env/completion_tokens": float(rollout.completion_mask.sum(1).mean()),
    }
    calls_by_level: dict[str, list[bool]] = {}
    for info in rollout.infos:
        calls_by_level.setdefault(info["level"], []).append(info["called_help"])
    if len(calls_by_level) > 1:
        for level, calls in sorted(calls_by_level.items()):
            metrics[f"env/help_rate/{level}"] = sum(calls) / len(calls)
    return metrics


class Trainer:
    """Builds everything a run needs from a `RunConfig` and trains it, resumable from checkpoints."""

    def __init__(self, run: RunConfig, run_dir: str | Path) -> None:
        self.run = run
        self.run_dir = Path(run_dir)
        self.train = run.train
        torch.manual_seed(run.seed)
        self.device = distributed.init(pick_device(run.train.device))
        device_config = resolve_device(run)
        self.run = run = dataclasses.replace(run, device=device_config)
        self.env = make_train_env(run)
        self.algorithm = make_algorithm(run.agent, run.train, run.budget, run.seed, run.env.max_new_tokens)
        self.policy = Policy.load(
            device_config,
            self.device,
            run.train.lora_rank,
            run.train.gradient_checkpointing,
            self.algorithm.needs_values,
        )
        if run.warmup is not None:
            from agents.warmup import format_warmup

            format_warmup(self.policy, run)
        self.reference = None
        distributed.broadcast_parameters(self.policy)
        if self.algorithm.needs_reference:
            self.reference = Policy.load(device_config, self.device)
            self.reference.requires_grad_(False)
        self.engine = make_rollout(self.policy, self.env, run.rollout, run.seed)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=run.train.lr, betas=tuple(run.train.betas), weight_decay=run.train.weight_decay
        )
        warmup = run.train.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        self.eval_prompts = [p.id for p in self.env.unwrapped.task.problems("test")][: run.train.eval_prompts]
        self.eval_env = make_eval_env(run, len(self.eval_prompts))
        self.start_step = self._resume()

    def _resume(self) -> int:
        resume = self.train.resume
        if resume == "never":
            return 0
        found = list_checkpoints(self.run_dir) if resume == "auto" else [Path(resume)]
        if not found:
            return 0
        state = load_checkpoint(found[-1], self.policy, self.optimizer, self.scheduler)
        check_same_run(found[-1], state["config"], self.run)
        budget = state.get("budget", {})
        self.env.unwrapped.budget.calls = budget.get("calls", 0)
        self.env.unwrapped.budget.episodes = budget.get("episodes", 0)
        return int(state["step"])

    def prompt_batch(self, step: int) -> list[int]:
        """The prompts of iteration `step` (1-based): a fresh seeded permutation of the training split per epoch."""
        ids = [p.id for p in self.env.unwrapped.task.problems("train")]
        size = self.train.prompts_per_step
        out = []
        for position in range((step - 1) * size, step * size):
            epoch, offset = divmod(position, len(ids))
            order = np.random.default_rng([self.run.seed, epoch]).permutation(len(ids))
            out.append(ids[order[offset]])
        return out

    def fit(self) -> dict[str, float]:
        """Train to `train.steps`, then evaluate on held-out prompts; returns the last metrics."""
        main = distributed.is_main()  # under torch.distributed, rank 0 evaluates, logs and saves
        log: RunLog | distributed.QuietLog = distributed.QuietLog()
        if main:
            log = RunLog(self.run_dir, self.train.steps, self.start_step, self.train.progress)
        metrics: dict[str, float] = {}
        try:
            for step in range(self.start_step + 1, self.train.steps + 1):
                metrics = self.step(step, log)
                is_last = step == self.train.steps
                if main and (is_last or (self.train.eval_every and step % self.train.eval_every == 0)):
                    metrics.update(self.evaluate().metrics("eval/"))
                log.log(step, metrics)
                if main and (is_last or (self.train.save_every and step % self.train.save_every == 0)):
                    self.save(step, metrics)
        finally:
            log.close()
        if main:
            (self.run_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=1))
        return metrics

    def step(self, step: int, log: RunLog | distributed.QuietLog) -> dict[str, float]:
        started = time.perf_counter()
        self.policy.eval()
        seed = (self.run.seed * 1_000_003 + step) * distributed.world_size() + distributed.rank()
        rollout = self.engine.rollout(
            distributed.shard(self.prompt_batch(step)), self.train.group_size, seed=seed
        )
        rollout = distributed.gather_rollout(rollout, int(self.policy.tokenizer.pad_token_id))
        generated = time.perf_counter()
        metrics = rollout_metrics(rollout)
        tokens = float(rollout.completion_mask.sum())
        self.policy.train()
        # Ratio-based losses need log-probs of the policy itself, not of the tempered sampler; a single
        # update takes them from its own forward pass instead of a scoring pass.
        tempered = self.run.rollout.temperature != 1.0 or self.run.rollout.top_p != 1.0
        reuse = tempered and single_update(self.algorithm)
        if tempered and not reuse:
            rollout.old_logprobs = score_batch(self.policy, rollout, self.train.micro_batch_size).logprobs
        batch, prepared = self.algorithm.prepare(rollout, step, self.policy, self.reference)
        metrics.update(prepared)
        if batch is not None:
            # Minibatch order seeded by step, not carried from step to step: a resumed run draws the
            # same order, and every rank draws the same one (each then takes its share of it).
            order = torch.Generator().manual_seed(self.run.seed * 1_000_003 + step)
            metrics.update(
                update(self.algorithm, self.policy, self.optimizer, batch, order, old_from_policy=reuse)
            )
            self.engine.sync_weights()
            self.scheduler.step()  # the warm-up counts updates, not iterations
        metrics["train/updated"] = float(batch is not None)
        done = time.perf_counter()
        stats = self.env.unwrapped.cloud.stats
        metrics.update(
            {
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/step_time": done - started,
                "train/generate_time": generated - started,
                "train/update_time": done - generated,
                "train/tokens_per_s": tokens / max(generated - started, 1e-9),
                "cloud/calls": float(stats.calls),
                "cloud/cache_hits": float(stats.cache_hits),
            }
        )
        log.log_samples(step, self._samples(rollout))
        return metrics

    def _samples(self, rollout: Rollout) -> list[dict[str, Any]]:
        tokenizer = self.policy.tokenizer
        out = []
        for i in range(min(self.train.log_samples, len(rollout.infos))):
            tokens = rollout.input_ids[i, -rollout.completion_len :][rollout.completion_mask[i].bool()]
            info = rollout.infos[i]
            question = self.env.unwrapped.task.problem(rollout.prompt_ids[i]).question
            out.append(
                {
                    "question": question,
                    "completion": tokenizer.decode(tokens),
                    "reward": float(rollout.rewards[i]),
                    "outcome": info["outcome"],
                }
            )
        return out

    def evaluate(self) -> EvalResult:
        return evaluate_policy(
            self.policy, self.eval_env, self.eval_prompts, self.run.rollout, self.run.evaluate.max_batch
        )

    def save(self, step: int, metrics: dict[str, float]) -> Path:
        budget = self.env.unwrapped.budget
        extra = {
            "config": config_snapshot(self.run),
            "metrics": metrics,
            "budget": {"calls": budget.calls, "episodes": budget.episodes},
        }
        return save_checkpoint(
            self.run_dir, step, self.policy, self.optimizer, self.scheduler, extra, self.train.keep_last
        )


def config_snapshot(run: RunConfig) -> dict[str, Any]:
    """The run's settings as JSON values, as checkpoints store them."""
    return json.loads(json.dumps(dataclasses.asdict(run), default=str))


def check_same_run(checkpoint: Path, saved: dict[str, Any], run: RunConfig, purpose: str = "resume") -> None:
    """Raise CheckpointError when `checkpoint` (whose state.json config is `saved`) was made with other
    settings than `run` in what `purpose` needs to match: RESUME_MUST_MATCH to resume from it,
    EVALUATE_MUST_MATCH to evaluate it as the run's result."""
    resuming = purpose == "resume"
    now = config_snapshot(run)
    for key in RESUME_MUST_MATCH if resuming else EVALUATE_MUST_MATCH:
        before, after = _dig(saved, key), _dig(now, key)
        if before != after:
            raise CheckpointError(
                f"cannot {'resume from' if resuming else purpose} {checkpoint}: its {key} was {before}, "
                f"this run has {after}. Use a new run directory (another `name=`, or hydra.run.dir=...) or "
                f"delete the old one{', or set train.resume=never' if resuming else ''}."
            )


def _dig(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree
