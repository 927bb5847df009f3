"""The training loop every algorithm shares: sample prompts, roll out G completions each, score them
in the environment, let the algorithm prepare its batch, update, log, evaluate, checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents import distributed
from agents.algorithm import score_batch, single_update, update
from agents.batch import Rollout
from agents.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from agents.config import RunConfig
from agents.evaluation import EvalResult, evaluate_policy
from agents.metrics import rollout_metrics
from agents.policy import HelpChoices, Policy, pick_device
from agents.precision import adamw
from agents.registry import make_algorithm
from agents.rollout import make_rollout
from agents.run_log import RunLog
from agents.runs import check_same_run, config_snapshot, make_env, make_eval_env, resolve_device
from agents.supervised import format_warmup
from collab_env.errors import ConfigError


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
        self.env = make_env(run)
        self.algorithm = make_algorithm(
            run.agent,
            run.train,
            run.budget,
            run.seed,
            run.env.max_new_tokens,
            HelpChoices.of(self.env.unwrapped.help_branches()),
        )
        self.policy = Policy.load(
            device_config,
            self.device,
            run.train.lora_rank,
            run.train.gradient_checkpointing,
            self.algorithm.needs_values,
        )
        if run.warmup is not None:
            format_warmup(self.policy, run)
        self.reference = None
        distributed.broadcast_parameters(self.policy)
        if self.algorithm.needs_reference:
            self.reference = Policy.load(device_config, self.device)
            self.reference.requires_grad_(False)
        self.engine = make_rollout(self.policy, self.env, run.rollout, run.seed)
        self.optimizer, self.master = adamw(
            self.policy,
            run.train.lr,
            tuple(run.train.betas),
            run.train.weight_decay,
            run.train.master_weights,
        )
        warmup = run.train.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        # Training evaluates on the validation split: the test split is kept for the final comparison.
        validation = self.env.unwrapped.task.problems("validation")
        if not validation:
            raise ConfigError(
                f"task {run.task.name!r} has no validation problems to evaluate training on: it needs at "
                "least two training problems (check task.num_train and the data files)."
            )
        self.eval_prompts = [p.id for p in validation][: run.train.eval_prompts]
        self.eval_env = make_eval_env(run, len(self.eval_prompts), split="validation")
        self.start_step = self._resume()

    def _resume(self) -> int:
        resume = self.train.resume
        if resume == "never":
            return 0
        found = list_checkpoints(self.run_dir) if resume == "auto" else [Path(resume)]
        if not found:
            return 0
        state = load_checkpoint(found[-1], self.policy, self.optimizer, self.scheduler, self.master)
        check_same_run(found[-1], state["config"], self.run)
        self.algorithm.load_state_dict(state.get("algorithm", {}))
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
            "algorithm": self.algorithm.state_dict(),
        }
        return save_checkpoint(
            self.run_dir,
            step,
            self.policy,
            self.optimizer,
            self.scheduler,
            extra,
            self.train.keep_last,
            self.master,
        )
