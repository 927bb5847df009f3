"""Typed settings of the environment side. Hydra's config groups `env`, `task`, `device`, `cloud`
and the top-level `budget` node map onto these dataclasses, so a misspelt key is an error.

Every class checks its values in `__post_init__` and raises `ConfigError` naming the field, the
allowed values and the fix. `coerce` turns what a user passes to `gym.make` (a name, a dict, a
dataclass or an OmegaConf node) into one of these classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from collab_env.errors import ConfigError, unknown_name

TEMPLATES = ("answer_tags", "numbered_steps", "plain")
BUDGET_MODES = ("none", "train", "cap", "penalty")
REWARD_VERSIONS = ("v1", "v3")
MARKER_MATCHES = ("strict", "lenient")
DTYPES = ("auto", "float32", "bfloat16")
SPLITS = ("train", "validation", "test")


def check_choice(field_name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise unknown_name("value", value, choices, field=field_name)


def check_range(field_name: str, value: float, low: float, high: float, why: str = "") -> None:
    if not low <= value <= high:
        raise ConfigError(
            f"{field_name}={value} is out of range [{low}, {high}].{(' ' + why) if why else ''}"
        )


@dataclass
class TaskConfig:
    """Which task the prompts come from and how they are presented to the device model."""

    name: str = "arithmetic"
    """Task source: arithmetic (embedded, difficulty levels), running_total (embedded, difficulty hidden
    in the computation), chain_sum, basic_arithmetic, countdown,
    gsm_symbolic (reasoning-gym generators), jsonl_math, jsonl_countdown (local files)."""
    template: str = "answer_tags"
    """Prompt template: answer_tags (paper Template I), numbered_steps (Template II) or plain
    (Template I without the help option, for the task-tuning-only baseline)."""
    num_train: int = 5000
    """Generated training prompts (generators), spread evenly over the levels."""
    num_test: int = 1000
    """Generated held-out prompts (generators), spread evenly over the levels."""
    validation_fraction: float = 0.04
    """Share of the training problems (the last ones) held out as the validation split, on which training
    runs evaluate while they train; the test split is kept for the final comparison (0.04 of 5,000: 200)."""
    seed: int = 0
    """Seed of the generators and of the train/test split of a single JSONL file."""
    levels: list[str] | None = None
    """Difficulty levels to generate (arithmetic); None means all of the task's levels."""
    path: str | None = None
    """JSONL file of the training split (or of both splits when test_path is None)."""
    test_path: str | None = None
    """JSONL file of the test split."""
    test_fraction: float = 0.2
    """Share of a single JSONL file held out as the test split (fixed by seed)."""
    max_steps: int = 6
    """Template II: the number of reasoning steps after which the model should ask for help."""
    generator: dict[str, Any] = field(default_factory=dict)
    """Extra settings passed to the reasoning-gym generator (e.g. min_numbers for countdown)."""
    use_all_numbers: bool = True
    """Countdown: an expression must use every number exactly once (TinyZero's rule); False allows a subset."""

    def __post_init__(self) -> None:
        check_choice("task.template", self.template, TEMPLATES)
        if self.num_train < 1 or self.num_test < 1:
            raise ConfigError(
                f"task.num_train={self.num_train} and task.num_test={self.num_test} must both be at least 1."
            )
        check_range("task.test_fraction", self.test_fraction, 0.0, 1.0)
        if not 0 < self.validation_fraction <= 0.5:
            raise ConfigError(
                f"task.validation_fraction={self.validation_fraction} must be in (0, 0.5]: training runs "
                "evaluate on the validation split, which needs at least one problem."
            )
        if self.max_steps < 1:
            raise ConfigError(f"task.max_steps={self.max_steps} must be at least 1.")


@dataclass
class DeviceConfig:
    """The on-device model and its tokenizer (the environment needs only the tokenizer)."""

    name: str = "smollm2"
    """smollm2 (embedded SmolLM2-135M-Instruct), tiny-arith (small LM warm-started by agents.warmup),
    tiny-random (random LLaMA-style model for tests) or path (any local Hugging Face directory)."""
    path: str | None = None
    """Model directory for name=path (and the built directory of tiny-arith once agents.warmup made it)."""
    dtype: str = "auto"
    """auto picks bfloat16 only where the CPU or GPU supports it natively, else float32."""
    hidden_size: int = 64
    """Shape of the tiny models (tiny-random, tiny-arith)."""
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    seed: int = 0
    """Initialisation seed of the tiny models."""
    recipe: dict[str, Any] = field(default_factory=dict)
    """Build recipe of locally trained models (tiny-arith); checked by agents.warmup. Its `trace: true`
    also tells the env that the device writes its steps before it answers or calls (`writes_trace`)."""

    @property
    def writes_trace(self) -> bool:
        """The device writes `<think>` steps first, so it can call for help after any step."""
        return bool(self.recipe.get("trace", False))

    def __post_init__(self) -> None:
        check_choice("device.name", self.name, ("smollm2", "tiny-arith", "tiny-random", "path"))
        check_choice("device.dtype", self.dtype, DTYPES)
        if self.name == "path" and not self.path:
            raise ConfigError("device.name=path needs device.path, the local model directory.")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"device.{name}={getattr(self, name)} must be at least 1.")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"device.hidden_size={self.hidden_size} must be divisible by device.num_heads={self.num_heads}."
            )


@dataclass
class CloudConfig:
    """Settings shared by every cloud oracle; each oracle adds its own fields in a subclass."""

    name: str = "simulated"
    """Oracle: simulated (embedded), transformers, vllm or openai."""
    cache_path: str | None = None
    """SQLite answer cache; None uses the user cache directory, ':memory:' keeps nothing on disk."""
    system_prompt: str | None = None
    """System prompt sent to the cloud; None sends the question alone, as the paper does."""


@dataclass
class SimulatedCloudConfig(CloudConfig):
    """A cloud that answers from the task's ground truth with a given accuracy."""

    accuracy: float = 0.98
    """Probability that an answer is correct, drawn deterministically per (seed, prompt)."""
    seed: int = 0
    latency_s: float = 2.0
    """Simulated latency per answer, counted in the oracle's statistics (never in env info)."""
    completion_tokens: int = 256
    """Simulated completion length per answer, for cost statistics."""

    def __post_init__(self) -> None:
        check_range("cloud.accuracy", self.accuracy, 0.0, 1.0)
        if self.latency_s < 0 or self.completion_tokens < 0:
            raise ConfigError("cloud.latency_s and cloud.completion_tokens must not be negative.")


@dataclass
class BudgetConfig:
    """Cloud budget: the paper's constraint E[cloud] <= rho * E[local] (v3 eq. 1)."""

    mode: str = "train"
    """none: count only; train: count (the agent's prompt filter enforces rho); cap: test time, a call
    that would exceed the share is refused and scored on the local answer; penalty: subtract `penalty`
    from the reward of every cloud call (the Lagrangian view, v3 App. B eqs. 9-11)."""
    ratio: float = 3 / 7
    """rho, cloud calls per local answer. The share of questions sent to the cloud is rho/(1+rho):
    rho=3/7 means 30%. Between 0 and 1 (at most half of the questions)."""
    window: int | None = None
    """cap mode: None admits a call while calls/episodes stays within the share (online rule); an
    integer N allows floor(share*N) calls per window of N episodes, first come first served (the
    paper's test-time truncation over a test set of N questions)."""
    penalty: float = 0.3
    """penalty mode: the Lagrange multiplier gamma subtracted per cloud call."""

    def __post_init__(self) -> None:
        check_choice("budget.mode", self.mode, BUDGET_MODES)
        check_range(
            "budget.ratio",
            self.ratio,
            0.0,
            1.0,
            "It is rho, cloud calls per local answer: rho=3/7 sends 30% of questions to the cloud.",
        )
        if self.window is not None and self.window < 1:
            raise ConfigError(f"budget.window={self.window} must be a positive number of episodes or null.")
        if self.penalty < 0:
            raise ConfigError(f"budget.penalty={self.penalty} must not be negative.")

    @property
    def share(self) -> float:
        """Largest fraction of questions that may go to the cloud: rho / (1 + rho)."""
        return self.ratio / (1.0 + self.ratio)


@dataclass
class RewardConfig:
    """Hierarchical reward (paper section 3.2): alpha_a > alpha_c > 0 (> alpha_f in v1)."""

    version: str = "v3"
    """v3: two levels (v3 eq. 18); v1: adds the format reward alpha_f (v1 eq. 5)."""
    alpha_a: float = 1.0
    """Reward of a correct answer produced on the device."""
    alpha_c: float = 0.3
    """Reward of a correct answer obtained by calling the cloud (the paper uses 0.2-0.6)."""
    alpha_f: float = 0.2
    """v1 only: reward of a local answer in the required format (think and answer tags)."""

    def __post_init__(self) -> None:
        check_choice("reward.version", self.version, REWARD_VERSIONS)
        if not self.alpha_a > self.alpha_c >= 0:
            raise ConfigError(
                f"reward needs alpha_a > alpha_c >= 0 (got alpha_a={self.alpha_a}, alpha_c={self.alpha_c}): "
                "a correct local answer must be worth more than one obtained from the cloud."
            )
        if self.version == "v1" and not self.alpha_c > self.alpha_f >= 0:
            raise ConfigError(
                f"reward v1 needs alpha_c > alpha_f >= 0 (got alpha_c={self.alpha_c}, alpha_f={self.alpha_f})."
            )


@dataclass
class EnvConfig:
    """Settings of the token-level environment itself."""

    max_new_tokens: int = 64
    """Device tokens per episode before truncation."""
    max_prompt_tokens: int = 256
    """Prompt window; a longer prompt raises PromptTooLongError naming this field."""
    marker_match: str = "lenient"
    """strict: only the exact marker calls for help; lenient: also misspellings and the untagged form
    'I need external assistance' at the end of the completion (paper-spec section 1.3)."""
    split: str = "train"
    """Split that reset() draws prompts from unless options={'split': ...} says otherwise."""
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 2:
            raise ConfigError(f"env.max_new_tokens={self.max_new_tokens} must be at least 2.")
        if self.max_prompt_tokens < 8:
            raise ConfigError(f"env.max_prompt_tokens={self.max_prompt_tokens} must be at least 8.")
        check_choice("env.marker_match", self.marker_match, MARKER_MATCHES)
        check_choice("env.split", self.split, SPLITS)
        self.reward = coerce(RewardConfig, self.reward, "env.reward")


C = TypeVar("C")


def to_plain(value: Any) -> Any:
    """An OmegaConf node or dataclass as plain Python containers; anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        DictConfig = ListConfig = ()  # type: ignore[assignment]
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def coerce(cls: type[C], value: Any, where: str, registry: dict[str, type] | None = None) -> C:
    """Build a config of class `cls` from None, a name, a dict, an OmegaConf node or an instance.

    With a `registry` (name -> subclass), a name or a dict's "name" picks the subclass.
    Unknown keys raise `ConfigError` listing the valid ones.
    """
    if isinstance(value, cls):
        return value
    value = to_plain(value)
    if value is None:
        value = {}
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a name, a dict or a {cls.__name__}, got {type(value).__name__}.")
    target = cls
    if registry is not None:
        name = value.get("name", getattr(cls, "name", None))
        if name not in registry:
            raise unknown_name(where, name, registry, field=f"{where}.name")
        target = registry[name]
    fields = {f.name for f in dataclasses.fields(target)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where} ({target.__name__}). Valid keys: {', '.join(sorted(fields))}."
        )
    return target(**value)
