"""Typed settings of runs: the dataclasses Hydra's config groups map onto (structured configs).

Every value is checked in its dataclass's `__post_init__` when a run builds its config objects,
before any model is loaded. Each agent's own settings live beside its algorithm (agents.gapg.GAPGConfig,
...) and extend `AgentConfig`; agents.registry stores every schema in Hydra's ConfigStore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from collab_env.config import (
    SPLITS,
    BudgetConfig,
    DeviceConfig,
    EnvConfig,
    TaskConfig,
    check_choice,
    check_range,
)
from collab_env.errors import ConfigError


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
        check_choice("rollout.backend", self.backend, ("env", "hf", "vllm"))
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
    master_weights: bool = True
    """Where the device model is in bf16 (`device.dtype`; auto picks it where native), AdamW steps fp32
    copies of its weights and rounds them into the model after each step (`agents/precision.py`); false
    steps the bf16 weights themselves, where steps under bf16's resolution are lost (at lr 1e-5, one
    step moved 2% of SmolLM2-135M's weights). No effect on an fp32 model."""
    skip_zero_advantage_rows: bool = True
    """For GRPO, DA-GRPO and GAPG without a KL term (`Algorithm.only_advantage_terms`), and one
    minibatch: the update does not forward the rows whose advantage is zero at every token (groups
    whose samples all earned the same reward), which add exactly zero to the gradient. The same
    estimator, not the same bits: the remaining rows are summed in another order, and sampling at T=1
    can part after a few steps; false computes what the update computed before this setting."""
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
        check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
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
    seeds: list[int] = field(default_factory=list)
    """Run seeds to train and evaluate every method with (each trained method gets one run per seed);
    the report gives each number as the mean over seeds with its min-max. Empty: the run's seed only."""
    train_missing: bool = True
    """Train the runs that trained methods need when they are missing or unfinished."""
    router_prompts: int = 1000
    """Training prompts whose device outcomes label the prompt router."""
    train_workers: int = 1
    """Missing runs trained side by side before the methods are evaluated, each in its own process with
    an equal share of the CPU cores (agents.baselines.trained.train_in_parallel), with the same
    checkpoints as one at a time: for machines with more cores than one small run uses (on 2 cores it
    gains nothing). 1: each run is trained in this process when its first method needs it."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"evaluate.split={self.split!r}; use one of: {', '.join(SPLITS)}.")
        if self.num_prompts < 0 or self.max_batch < 1 or self.max_new_tokens < 0:
            raise ConfigError("evaluate.num_prompts and max_new_tokens must be >= 0, max_batch >= 1.")
        if self.train_workers < 1:
            raise ConfigError(
                f"evaluate.train_workers={self.train_workers} must be >= 1 (1: one run at a time)."
            )


@dataclass
class AgentConfig:
    """Fields every agent config has; each agent's own settings extend it (agents.gapg.GAPGConfig, ...)."""

    name: str = ""
    epochs: int = 1
    """Passes over each rollout batch."""
    minibatches: int = 1
    """Optimizer steps per pass (the batch is split into this many shuffled minibatches)."""


@dataclass
class FormatWarmupConfig:
    """`warmup=format_sft`: a short supervised pass before RL that teaches a pretrained instruct model
    the answer format and the call-for-help marker (off by default, as in the paper)."""

    name: str = "format_sft"
    steps: int = 30
    """Optimizer steps."""
    batch_size: int = 8
    """Generated training examples per step."""
    lr: float = 3e-5
    """Peak AdamW learning rate (same schedule as tiny-arith). It trains every parameter, or only the
    LoRA adapters when train.lora_rank > 0."""
    marker_fraction: float = 0.1
    """Share of targets of every level that are the call-for-help marker instead of the answer."""
    levels: list[str] | None = None
    """Task levels to draw examples from (None: every level)."""
    seed: int = 0
    """Seed of the example draws."""

    def __post_init__(self) -> None:
        if self.name != "format_sft":
            raise ConfigError(f"warmup.name={self.name!r}; the only warm-up is format_sft (or warmup=null).")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"warmup.{name}={getattr(self, name)} must be at least 1.")
        if self.lr <= 0:
            raise ConfigError(f"warmup.lr={self.lr} must be positive.")
        if self.levels is not None and not self.levels:
            raise ConfigError("warmup.levels=[] trains on nothing: list some levels or use null for all.")
        check_range("warmup.marker_fraction", self.marker_fraction, 0.0, 1.0)


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
