"""Methods that need a training run: task-tuning only, Collaboration-Aware Tuning (GRPO / Dr. GRPO
with the hierarchical reward, no filtering), PPO, a Lagrangian baseline in the spirit of DA-GRPO,
and GAPG.

Runs live in `<experiment dir>/runs/<agent>-<template>/seed<seed>/`, the directory that
`python -m agents.train` uses for the same experiment, so a run trained by hand is picked up here.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from agents.baselines.context import EvalContext, MethodResult
from agents.checkpoint import list_checkpoints, load_checkpoint
from agents.config import RunConfig
from agents.metrics import summarize
from agents.policy import Policy
from agents.registry import AGENTS
from agents.runs import check_same_run, held_out_cap
from agents.trainer import Trainer
from collab_env.config import BudgetConfig
from collab_env.errors import DeviceCloudError


class MissingRunError(DeviceCloudError):
    """A method needs a training run that does not exist and may not be trained now."""


RunKey = tuple[str, str | None]
"""A training run as (agent, template), None for the task's own template; seed and settings come
from the context."""

TASK_TUNED: RunKey = ("grpo", "plain")
"""Task-tuning: GRPO without the help option, the model every router routes for."""

RUNS: dict[str, RunKey] = {
    "task_tuning": TASK_TUNED,
    "collab_grpo": ("grpo", None),
    "collab_dr_grpo": ("dr_grpo", None),
    "ppo": ("ppo", None),
    "da_grpo": ("da_grpo", None),
    "gapg": ("gapg", None),
    "collab_grpo_calibrated": ("grpo", None),
    "da_grpo_calibrated": ("da_grpo", None),
    "gapg_calibrated": ("gapg", None),
}
"""The run behind each method of this module."""


def variant(run: RunConfig, agent_name: str, template: str | None) -> RunConfig:
    """The run's settings with another agent (its own defaults unless it is the configured one) and template."""
    agent = run.agent if getattr(run.agent, "name", None) == agent_name else AGENTS[agent_name].config()
    task = dataclasses.replace(run.task, template=template or run.task.template)
    return dataclasses.replace(run, agent=agent, task=task)


def run_directory(ctx: EvalContext, run: RunConfig) -> Path:
    return ctx.experiment_dir / "runs" / f"{run.agent.name}-{run.task.template}" / f"seed{run.seed}"


def finished_checkpoint(run_dir: Path, steps: int) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints and checkpoints[-1].name == f"step_{steps:06d}" else None


def load_trained(ctx: EvalContext, run: RunConfig, checkpoint: Path) -> Policy:
    """The policy of a finished run's last checkpoint, which must have been trained with `run`'s
    settings (a run left by an earlier config under the same name is an error, not a silent reuse)."""
    needs_values = AGENTS[run.agent.name].algorithm.needs_values
    policy = Policy.load(ctx.device_config, ctx.device, run.train.lora_rank, value_head=needs_values)
    state = load_checkpoint(checkpoint, policy, None, None)
    check_same_run(checkpoint, state["config"], run, "evaluate")
    return policy.eval()


def trained_policy(ctx: EvalContext, agent_name: str, template: str | None) -> tuple[Policy, Path]:
    """The final policy of a run (trained now if missing and `evaluate.train_missing`) and its directory."""
    run = variant(ctx.run, agent_name, template)
    run_dir = run_directory(ctx, run)

    def obtain() -> Policy:
        checkpoint = finished_checkpoint(run_dir, run.train.steps)
        if checkpoint is not None:
            return load_trained(ctx, run, checkpoint)
        if not ctx.run.evaluate.train_missing:
            raise MissingRunError(
                f"no finished run in {run_dir}; train it with `python -m agents.train experiment=... "
                f"agent={agent_name} task.template={run.task.template}` or set evaluate.train_missing=true."
            )
        print(f"[evaluate] training {agent_name} ({run.task.template} template) in {run_dir}", flush=True)
        trainer = Trainer(run, run_dir)
        trainer.fit()
        return trainer.policy.eval()

    return ctx.memo(f"policy:{run_dir}", obtain), run_dir


def missing_runs(ctx: EvalContext, keys: Iterable[RunKey]) -> list[tuple[RunConfig, Path]]:
    """The settings and directory of each distinct run of `keys` that has no finished checkpoint yet."""
    missing = []
    for agent, template in dict.fromkeys(keys):
        run = variant(ctx.run, agent, template)
        run_dir = run_directory(ctx, run)
        if finished_checkpoint(run_dir, run.train.steps) is None:
            missing.append((run, run_dir))
    return missing


def train_in_parallel(runs: list[tuple[RunConfig, Path]], workers: int) -> None:
    """Trains `runs`, `workers` at a time, each in its own process with an equal share of the CPU cores
    as torch threads; the checkpoints are the same as one run after the other (thread counts do not
    change them, tests/test_parallel_runs.py). It pays where one run cannot use the cores a machine
    has; on 2 idle cores torch's two threads already speed a tiny-arith update up 1.8x, and the main
    job took the same time either way (docs/performance.md, "The main job's wall time"). Each run
    keeps its own checkpoints: an interrupted batch resumes where each run stopped."""
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    print(
        f"[evaluate] training {len(runs)} runs, {workers} at a time with {threads} torch thread(s) each: "
        + ", ".join(str(run_dir) for _, run_dir in runs),
        flush=True,
    )
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=spawn, initializer=torch.set_num_threads, initargs=(threads,)
    ) as pool:
        for done in [pool.submit(fit_run, run, run_dir) for run, run_dir in runs]:
            done.result()


def fit_run(run: RunConfig, run_dir: Path) -> None:
    """Trains one run to its last step (resuming from its latest checkpoint); a worker of `train_in_parallel`."""
    Trainer(run, run_dir).fit()


def _trained(ctx: EvalContext, name: str, label: str) -> MethodResult:
    agent, template = RUNS[name]
    policy, run_dir = trained_policy(ctx, agent, template)
    return ctx.policy_result(name, label, policy, template, training_metrics=run_dir / "metrics.csv")


def _calibrated(ctx: EvalContext, name: str, label: str) -> MethodResult:
    """The run behind the method's uncalibrated row, decoded with a help bias calibrated to the budget
    (`calibrated_result`)."""
    policy, run_dir = trained_policy(ctx, *RUNS[name])
    return ctx.calibrated_result(
        name, f"{label}, budget-calibrated", policy, training_metrics=run_dir / "metrics.csv"
    )


def task_tuning(ctx: EvalContext) -> MethodResult:
    """GRPO on the task without the help option; every question answered on the device."""
    return _trained(ctx, "task_tuning", "Task-tuning only (GRPO)")


def collab_grpo(ctx: EvalContext) -> MethodResult:
    """Hierarchical reward + GRPO on every prompt (paper v1's Collaboration-Aware Tuning)."""
    return _trained(ctx, "collab_grpo", "Hier. reward + GRPO (no filter)")


def collab_dr_grpo(ctx: EvalContext) -> MethodResult:
    """Hierarchical reward + Dr. GRPO on every prompt (paper v3's Collaboration-Aware Tuning)."""
    return _trained(ctx, "collab_dr_grpo", "Hier. reward + Dr. GRPO (no filter)")


def ppo(ctx: EvalContext) -> MethodResult:
    """Hierarchical reward + token-level PPO with a value head."""
    return _trained(ctx, "ppo", "Hier. reward + PPO")


def da_grpo(ctx: EvalContext) -> MethodResult:
    """Dual-advantage group policy gradient with a Lagrange multiplier on the cloud rate, in the spirit
    of DA-GRPO (arXiv 2602.00166; agents.da_grpo, not a reproduction), with the help option."""
    return _trained(ctx, "da_grpo", "Lagrangian GRPO (DA-GRPO-style)")


def collab_grpo_calibrated(ctx: EvalContext) -> MethodResult:
    return _calibrated(ctx, "collab_grpo_calibrated", "Hier. reward + GRPO (no filter)")


def da_grpo_calibrated(ctx: EvalContext) -> MethodResult:
    return _calibrated(ctx, "da_grpo_calibrated", "Lagrangian GRPO (DA-GRPO-style)")


def gapg_calibrated(ctx: EvalContext) -> MethodResult:
    return _calibrated(ctx, "gapg_calibrated", "GAPG (ours)")


def gapg(ctx: EvalContext) -> MethodResult:
    """GAPG; when budget-sweep runs exist (`python -m agents.train -m budget.ratio=...`), their capped
    results are shown beside its help-bias curve."""
    result = _trained(ctx, "gapg", "GAPG (ours)")
    result.sweep_points = sweep_points(ctx, "gapg")
    return result


def sweep_points(ctx: EvalContext, agent_name: str) -> list[tuple[float, float]]:
    """(cloud rate, accuracy) of every finished budget-sweep run of `agent_name`, each under its own cap."""
    root = ctx.experiment_dir / "sweep" / f"{agent_name}-{ctx.run.task.template}"
    points = []
    for state in sorted(root.glob("*/seed*/checkpoints/step_*/state.json")) if root.is_dir() else []:
        saved = json.loads(state.read_text())["config"]
        run = dataclasses.replace(variant(ctx.run, agent_name, None), budget=BudgetConfig(**saved["budget"]))
        checkpoint = state.parent
        if finished_checkpoint(checkpoint.parent.parent, run.train.steps) != checkpoint:
            continue
        policy = load_trained(ctx, run, checkpoint)
        metrics = summarize(ctx.evaluate(policy, budget=held_out_cap(run, len(ctx.prompt_ids))).infos)
        points.append((metrics["cloud_rate"], metrics["accuracy"]))
    return sorted(points)
