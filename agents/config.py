"""Typed settings of runs, mapped onto Hydra's config groups (structured configs).

Each group option in `configs/<group>/<name>.yaml` starts from a schema stored here
(`base_<group>_<name>` or `base_<group>`), so a misspelt key or a wrong type is an error at
start-up, and every value is checked again in its dataclass's `__post_init__` when the run
builds its config objects (`OmegaConf.to_object`), before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from collab_env.cloud import CLOUD_CONFIGS, cloud_config
from collab_env.config import BudgetConfig, DeviceConfig, EnvConfig, TaskConfig
from collab_env.errors import ConfigError, unknown_name

AGENT_CONFIGS: dict[str, type] = {}
"""Agent name (the `agent` group option) -> its settings dataclass; filled by `register_agent`."""


EXTERNAL_TRAINERS: dict[str, str] = {}
"""Agent name -> "module:function(run, run_dir) -> metrics" for agents trained by another library
(Stable-Baselines3, Tianshou) instead of the shared rollout-and-update loop."""


def register_agent(name: str, config_class: type, external_trainer: str | None = None) -> type:
    """File `config_class` as the schema of `agent=<name>`; a taken name with another class is an error.

    `external_trainer` ("module:function") marks agents that bring their own training loop.
    """
    if AGENT_CONFIGS.get(name, config_class) is not config_class:
        raise ValueError(f"agent {name!r} is already registered with {AGENT_CONFIGS[name].__name__}")
    AGENT_CONFIGS[name] = config_class
    if external_trainer is not None:
        EXTERNAL_TRAINERS[name] = external_trainer
    return config_class


@dataclass
class RolloutConfig:
    """How completions are generated for training."""

    backend: str = "hf"
    """hf (batched generation with a KV cache), vllm (in-process engine, weights synced after each
    update) or env (token by token through the vector env; slow but exact)."""
    temperature: float = 1.0
    """Sampling temperature during training (the paper uses 1.0)."""
    top_p: float = 1.0
    max_batch: int = 256
    """Most sequences generated in one batch; larger rollouts are split."""

    def __post_init__(self) -> None:
        if self.backend not in ("hf", "vllm", "env"):
            raise ConfigError(f"rollout.backend={self.backend!r}; choose one of: env, hf, vllm.")
        if not 0 < self.temperature <= 10:
            raise ConfigError(f"rollout.temperature={self.temperature} must be in (0, 10] for training.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p={self.top_p} must be in (0, 1].")
        if self.max_batch < 1:
            raise ConfigError(f"rollout.max_batch={self.max_batch} must be at least 1.")


@dataclass
class TrainConfig:
    """The shared training loop: batch shape, optimizer, checkpoints, evaluation hook."""

    steps: int = 100
    """Rollout-and-update iterations (the paper's S)."""
    prompts_per_step: int = 8
    """Prompts per iteration, |D_b| (the paper: 32 for Countdown, 128 for MATH)."""
    group_size: int = 8
    """Completions per prompt, G (the paper: 8)."""
    lr: float = 1e-5
    """Learning rate eta of AdamW."""
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in iterations; constant afterwards."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables it)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward; gradients are accumulated, so results do not depend on it."""
    eval_every: int = 0
    """Greedy evaluation on held-out prompts every this many iterations (0: only at the end)."""
    eval_prompts: int = 200
    save_every: int = 25
    """Checkpoint every this many iterations (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    resume: str = "auto"
    """auto: continue from the newest checkpoint in the run directory if there is one; never; or a path."""
    log_samples: int = 4
    """Completions written to samples.jsonl per iteration."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    lora_rank: int = 0
    """LoRA rank through peft; 0 trains every parameter."""
    gradient_checkpointing: bool = False
    progress: bool = True
    """Show a progress bar (a periodic line when not on a terminal)."""

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "micro_batch_size", "keep_last", "eval_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be at least 1.")
        if self.group_size < 2:
            raise ConfigError(
                f"train.group_size={self.group_size}: group methods need G >= 2 completions per prompt "
                "(the group baseline divides by G-1)."
            )
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be positive.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device={self.device!r}; choose one of: auto, cpu, cuda.")
        if self.lora_rank < 0 or self.save_every < 0 or self.eval_every < 0 or self.warmup_steps < 0:
            raise ConfigError(
                "train.lora_rank, save_every, eval_every and warmup_steps must not be negative."
            )
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas={self.betas} must hold two numbers.")


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy decoding, the test-time cloud cap, and which methods to compare."""

    split: str = "test"
    num_prompts: int = 0
    """Prompts evaluated (0: the whole split)."""
    max_batch: int = 128
    """Sequences decoded together."""
    max_new_tokens: int = 0
    """0: the env's max_new_tokens."""
    methods: list[str] = field(default_factory=lambda: ["device_only", "cloud_only"])
    """Methods compared in the report (agents.baselines.METHODS)."""
    seed: int = 0
    """Seed of randomised baselines (random offload)."""
    train_missing: bool = True
    """Train the runs that trained methods need when they are missing or unfinished."""
    router_prompts: int = 1000
    """Training prompts whose device outcomes label the prompt router."""

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise ConfigError(f"evaluate.split={self.split!r}; use train or test.")
        if self.num_prompts < 0 or self.max_batch < 1 or self.max_new_tokens < 0:
            raise ConfigError("evaluate.num_prompts and max_new_tokens must be >= 0, max_batch >= 1.")


@dataclass
class RunConfig:
    """Everything one run needs; the top-level node of `configs/train.yaml` and `configs/evaluate.yaml`."""

    env: EnvConfig = field(default_factory=EnvConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    cloud: Any = MISSING
    """A CloudConfig subclass chosen by the `cloud` group (simulated, openai, ...)."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    agent: Any = None
    """The agent's settings dataclass, chosen by the `agent` group (gapg, grpo, ...)."""
    warmup: Any = None
    """Optional format warm-up before training (the `warmup` group; null = none, as in the paper)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    name: str = "run"
    """Short name of the run, used in output paths and reports."""
    run_dir: str | None = None
    """agents.evaluate: a training run directory (or a multirun sweep directory) to evaluate."""


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
    for name, config_class in AGENT_CONFIGS.items():
        store.store(group="agent", name=f"base_agent_{name}", node=config_class)
    from agents.warmup import FormatWarmupConfig

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
    if agent_name not in AGENT_CONFIGS:
        raise unknown_name("agent", agent_name, AGENT_CONFIGS, field="agent.name")
    if type(run.agent) is not AGENT_CONFIGS[agent_name]:
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
