"""Every agent by name, and the Hydra schemas of a run.

`AGENTS` is the one list of agents: `agent=<name>` picks its settings dataclass, and either its
`Algorithm` (trained by agents.trainer's shared rollout-and-update loop) or its own `train` function
(Stable-Baselines3, Tianshou). `register_configs` stores every schema in Hydra's ConfigStore: each
group option in `configs/<group>/<name>.yaml` starts from one (`base_<group>_<name>` or
`base_<group>`), so a misspelt key or a wrong type is an error at start-up; `to_objects` then builds
the checked dataclasses of a composed config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from agents import sb3, tianshou
from agents.algorithm import Algorithm
from agents.config import FormatWarmupConfig, RolloutConfig, RunConfig, TrainConfig
from agents.da_grpo import DAGRPO, DAGRPOConfig
from agents.gapg import GAPG, GAPGConfig
from agents.grpo import GRPO, DrGRPOConfig, GRPOConfig
from agents.policy import HelpChoices
from agents.ppo import PPO, PPOConfig
from collab_env.cloud import CLOUD_CONFIGS, cloud_config
from collab_env.config import BudgetConfig, DeviceConfig, EnvConfig, TaskConfig
from collab_env.errors import ConfigError, unknown_name


@dataclass(frozen=True)
class Agent:
    """One `agent=<name>` option: its settings and how it trains."""

    config: type
    """Its settings dataclass (the schema of `configs/agent/<name>.yaml`)."""
    algorithm: type[Algorithm] | None = None
    """Trained by agents.trainer.Trainer with this algorithm's `prepare` and `loss`."""
    train: Callable[[RunConfig, Path], dict[str, float]] | None = None
    """Or trained by another library's loop: `train(run, run_dir) -> final metrics`."""


AGENTS: dict[str, Agent] = {
    "gapg": Agent(GAPGConfig, algorithm=GAPG),
    "grpo": Agent(GRPOConfig, algorithm=GRPO),
    "dr_grpo": Agent(DrGRPOConfig, algorithm=GRPO),
    "ppo": Agent(PPOConfig, algorithm=PPO),
    "da_grpo": Agent(DAGRPOConfig, algorithm=DAGRPO),
    "sb3_ppo": Agent(sb3.SB3PPOConfig, train=sb3.train),
    "tianshou_ppo": Agent(tianshou.TianshouPPOConfig, train=tianshou.train),
}


def make_algorithm(
    config: Any,
    train: TrainConfig,
    budget: BudgetConfig,
    seed: int,
    max_new_tokens: int,
    help_choices: HelpChoices | None = None,
) -> Algorithm:
    """The algorithm of the agent whose settings are `config` (`help_choices`: where the env's
    completions could call, for an algorithm that treats the help decision apart)."""
    name = getattr(config, "name", None)
    algorithm = AGENTS[name].algorithm if name in AGENTS else None
    if algorithm is None:
        trained_here = [n for n, agent in AGENTS.items() if agent.algorithm is not None]
        raise unknown_name("agent", name, trained_here, field="agent.name")
    return algorithm(config, train, budget, seed, max_new_tokens, help_choices)


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="base_run", node=RunConfig)
    store.store(group="env", name="base_env", node=EnvConfig)
    store.store(group="task", name="base_task", node=TaskConfig)
    store.store(group="device", name="base_device", node=DeviceConfig)
    store.store(group="budget", name="base_budget", node=BudgetConfig)
    store.store(group="rollout", name="base_rollout", node=RolloutConfig)
    for name, config_class in CLOUD_CONFIGS.items():
        store.store(group="cloud", name=f"base_cloud_{name}", node=config_class)
    for name, agent in AGENTS.items():
        store.store(group="agent", name=f"base_agent_{name}", node=agent.config)
    store.store(group="warmup", name="base_warmup_format_sft", node=FormatWarmupConfig)


def to_objects(cfg: DictConfig | RunConfig) -> RunConfig:
    """The validated dataclass objects of a composed config: every `__post_init__` check, then `check_run`."""
    if isinstance(cfg, RunConfig):
        return cfg
    try:
        run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except Exception as err:  # OmegaConf wraps the ConfigError raised by a dataclass check
        cause = err
        while cause.__cause__ is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise
    return check_run(run)


def check_run(run: RunConfig) -> RunConfig:
    """Checks across groups, which no single dataclass can make; returns `run`.

    - The agent and the cloud must be what their group built: Hydra picks the class from the group
      option, so `agent.name=nope` or `cloud.name=nope` would otherwise fail deep inside start-up.
    - agent.minibatches must divide the sequences of a batch (train.prompts_per_step x
      train.group_size): `update()` splits a batch into that many parts with torch.chunk and weighs
      each as 1/minibatches of it, so uneven parts would weigh sequences unequally, and torch.chunk
      returns fewer parts than asked when the count does not divide (12 sequences in 5 gives 4 parts).
      micro_batch_size needs no such rule: gradients accumulate over micro-batches exactly.
    """
    agent_name = getattr(run.agent, "name", None)
    if agent_name not in AGENTS:
        raise unknown_name("agent", agent_name, AGENTS, field="agent.name")
    if type(run.agent) is not AGENTS[agent_name].config:
        raise ConfigError(
            f"agent.name={agent_name!r} does not match the settings of the chosen agent "
            f"({type(run.agent).__name__}); pick the agent with the agent group instead (agent={agent_name})."
        )
    cloud_config(run.cloud)
    sequences = run.train.prompts_per_step * run.train.group_size
    minibatches = getattr(run.agent, "minibatches", 1)
    if sequences % minibatches:
        divisors = [d for d in range(1, min(sequences, 64) + 1) if sequences % d == 0]
        raise ConfigError(
            f"agent.minibatches={minibatches} must divide the {sequences} sequences of a batch "
            f"(train.prompts_per_step={run.train.prompts_per_step} x train.group_size={run.train.group_size}): "
            f"each minibatch is weighed as 1/{minibatches} of the batch. Choose one of: "
            f"{', '.join(map(str, divisors))}."
        )
    return run
