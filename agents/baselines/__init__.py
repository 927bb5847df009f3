"""Methods compared on held-out prompts (paper-spec section 6). Each is a function
`(EvalContext) -> MethodResult` listed by name in `METHODS`; `agents.evaluate` runs those named in
`evaluate.methods`.

| name             | what it is                                                                 |
|------------------|----------------------------------------------------------------------------|
| `cloud_only`     | every question to the cloud (upper bound)                                  |
| `device_only`    | the untrained device answers everything                                    |
| `device_with_help` | the untrained device with the help option (where training starts)        |
| `device_with_help_calibrated` | the same, its help bias calibrated to the budget on training prompts |
| `task_tuning`    | GRPO-tuned device without the help option, answers everything              |
| `random_offload` | task-tuned device, a random rho/(1+rho) share of questions to the cloud     |
| `prompt_router`  | task-tuned device + classifier on prompt embeddings, threshold at the budget |
| `probe_router`   | task-tuned device + probe on its own hidden state of the prompt, before answering |
| `feature_router` | task-tuned device + gradient boosting on the question's numbers and operations |
| `confidence_router` | task-tuned device answers; its least confident attempts go to the cloud |
| `oracle_router`  | task-tuned device, offloads exactly the questions it gets wrong (upper bound) |
| `sb3_router`     | task-tuned device + SB3 PPO router trained on DeviceCloudRouting-v0         |
| `tianshou_router` | task-tuned device + Tianshou PPO router trained on DeviceCloudRouting-v0   |
| `collab_grpo`    | hierarchical reward + GRPO, no filtering (Collaboration-Aware Tuning, v1)   |
| `collab_dr_grpo` | hierarchical reward + Dr. GRPO, no filtering (Collaboration-Aware Tuning, v3) |
| `ppo`            | hierarchical reward + token-level PPO with a value head                    |
| `da_grpo`        | Lagrangian group baseline in the spirit of DA-GRPO (2602.00166; not a reproduction) |
| `gapg`           | GAPG (the paper's method)                                                  |
| `collab_grpo_calibrated`, `da_grpo_calibrated`, `gapg_calibrated` | the trained policy, decoded with one bias on its help action chosen so that it calls on the budget's share of the training prompts, as a router's threshold is (`EvalContext.calibrated_result`) |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from agents.baselines import reference, routers, signal_routers, trained
from agents.baselines.context import EvalContext, MethodResult
from agents.config import RunConfig
from collab_env.errors import unknown_name

Method = Callable[[EvalContext], MethodResult]

METHODS: dict[str, Method] = {
    "cloud_only": reference.cloud_only,
    "device_only": reference.device_only,
    "device_with_help": reference.device_with_help,
    "device_with_help_calibrated": reference.device_with_help_calibrated,
    "task_tuning": trained.task_tuning,
    "random_offload": routers.random_offload,
    "prompt_router": routers.prompt_router,
    "probe_router": signal_routers.probe_router,
    "feature_router": signal_routers.feature_router,
    "confidence_router": signal_routers.confidence_router,
    "oracle_router": routers.oracle_router,
    "sb3_router": routers.sb3_router,
    "tianshou_router": routers.tianshou_router,
    "collab_grpo": trained.collab_grpo,
    "collab_dr_grpo": trained.collab_dr_grpo,
    "ppo": trained.ppo,
    "da_grpo": trained.da_grpo,
    "gapg": trained.gapg,
    "collab_grpo_calibrated": trained.collab_grpo_calibrated,
    "da_grpo_calibrated": trained.da_grpo_calibrated,
    "gapg_calibrated": trained.gapg_calibrated,
}


ROUTED_FOR_TASK_TUNING = (
    "random_offload",
    "prompt_router",
    "probe_router",
    "feature_router",
    "confidence_router",
    "oracle_router",
    "sb3_router",
    "tianshou_router",
)
"""Methods that route for the task-tuned device, so need its run."""

RUNS: dict[str, trained.RunKey] = {
    **trained.RUNS,
    **dict.fromkeys(ROUTED_FOR_TASK_TUNING, trained.TASK_TUNED),
}
"""The training run behind each method that needs one."""


def train_runs_first(run: RunConfig, experiment_dir: Path, seeds: list[int]) -> bool:
    """With `evaluate.train_workers` > 1 (and `train_missing`), trains the missing runs that the methods
    of `evaluate.methods` need for every seed of `seeds` before any method is evaluated, that many at a
    time (`trained.train_in_parallel`); returns whether it trained any. Otherwise each method trains its
    run when it first needs it."""
    workers = run.evaluate.train_workers
    if workers < 2 or not run.evaluate.train_missing:
        return False
    keys = [RUNS[name] for name in run.evaluate.methods if name in RUNS]
    missing = [
        missing
        for seed in seeds
        for missing in trained.missing_runs(
            EvalContext(dataclasses.replace(run, seed=seed), experiment_dir), keys
        )
    ]
    if len(missing) < 2:
        return False
    trained.train_in_parallel(missing, min(workers, len(missing)))
    return True


def run_method(name: str, ctx: EvalContext) -> MethodResult:
    """The result of the method `name` (one of `evaluate.methods`) on the context's held-out prompts."""
    if name not in METHODS:
        raise unknown_name("method", name, METHODS, field="evaluate.methods")
    return METHODS[name](ctx)


__all__ = ["METHODS", "RUNS", "EvalContext", "MethodResult", "run_method", "train_runs_first"]
