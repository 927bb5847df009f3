"""Hydra entry point: `python -m agents.train experiment=arithmetic_cpu [agent=grpo] [key=value ...]`.

The run directory is `outputs/<name>/runs/<agent>-<template>/seed<seed>`; running the same command again resumes
from its newest checkpoint (`train.resume=auto`). A sweep: `python -m agents.train -m budget.ratio=0.1,0.3`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from agents.config import RunConfig
from agents.registry import AGENTS, register_configs, to_objects
from agents.runs import make_env
from agents.trainer import Trainer
from collab_env.cloud import check_cloud
from collab_env.config import SimulatedCloudConfig

register_configs()


def preflight(run: RunConfig) -> None:
    """Everything that can fail without model weights, checked before any are loaded (or built).

    `to_objects` has checked the values; this checks what they point at: the cloud's API key
    variable or model directory (without building the oracle, which may load a model), then, by
    building the training env with an in-memory simulated cloud, the task's data files and rows
    and the tokenizer of a model directory. Every prompt is tokenized, so one longer than
    env.max_prompt_tokens fails now rather than when it is first drawn, maybe hours into training.
    """
    check_cloud(run.cloud)
    env = make_env(dataclasses.replace(run, cloud=SimulatedCloudConfig(cache_path=":memory:")))
    try:
        env.unwrapped.check_prompts()
    finally:
        env.close()


def train(cfg: DictConfig | RunConfig, run_dir: Path) -> dict[str, float]:
    """What `python -m agents.train` runs: check the config, check what needs no weights, then train."""
    run = to_objects(cfg)
    preflight(run)
    own_loop = AGENTS[run.agent.name].train
    if own_loop is not None:
        return own_loop(run, run_dir)
    return Trainer(run, run_dir).fit()


@hydra.main(version_base=None, config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> dict[str, float]:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    metrics = train(cfg, run_dir)
    summary = ", ".join(
        f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith("eval/") and "/" not in k[5:]
    )
    print(f"[train] done: {run_dir}  {summary}")
    return metrics


if __name__ == "__main__":
    main()
