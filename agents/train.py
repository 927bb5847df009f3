"""Hydra entry point: `python -m agents.train experiment=arithmetic_cpu [agent=grpo] [key=value ...]`.

The run directory is `outputs/<name>/<agent>/seed<seed>`; running the same command again resumes
from its newest checkpoint (`train.resume=auto`). A sweep: `python -m agents.train -m budget.ratio=0.1,0.3`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import agents.gapg  # noqa: F401  (registers the algorithms before Hydra reads the agent group)
import agents.grpo  # noqa: F401
import agents.ppo  # noqa: F401
from agents.config import EXTERNAL_TRAINERS, register_configs, to_objects
from agents.trainer import Trainer

register_configs()


@hydra.main(version_base=None, config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> dict[str, float]:
    run = to_objects(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if run.agent.name in EXTERNAL_TRAINERS:
        module, function = EXTERNAL_TRAINERS[run.agent.name].split(":")
        metrics = getattr(importlib.import_module(module), function)(run, run_dir)
    else:
        metrics = Trainer(run, run_dir).fit()
    summary = ", ".join(
        f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith("eval/") and "/" not in k[5:]
    )
    print(f"[train] done: {run_dir}  {summary}")
    return metrics


if __name__ == "__main__":
    main()
