"""A run's settings -> the objects it works with: its device model, its environments, its budget at
test time, and the check that a checkpoint belongs to it.

Everything that builds an environment from a `RunConfig` goes through here (the trainer, the held-out
evaluation, the baselines and the SB3 / Tianshou adapters), so every env of a run, token level or
routing, training or held-out, gets the same task, device, cloud, reward and env settings.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym

import collab_env  # noqa: F401  (registers DeviceCloud-v0 and DeviceCloudRouting-v0)
from agents.checkpoint import CheckpointError
from agents.config import RunConfig
from agents.tiny_arith import ensure_tiny_arith
from collab_env.config import BudgetConfig, DeviceConfig
from collab_env.errors import ConfigError

ENV_KINDS = ("routing", "token")
"""`agent.env` of the SB3 / Tianshou agents: DeviceCloudRouting-v0 or DeviceCloud-v0."""

RESUME_MUST_MATCH = ("agent", "task", "device", "env", "train.group_size", "train.prompts_per_step", "seed")
EVALUATE_MUST_MATCH = (*RESUME_MUST_MATCH, "train.lr", "rollout.temperature")
"""A finished run is reused by `agents.evaluate` only if trained with these settings of the config."""


def resolve_device(run: RunConfig) -> DeviceConfig:
    """The device config to load: models built locally (tiny-arith) are built or found in the cache first."""
    if run.device.name == "tiny-arith" and not run.device.path:
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


def held_out_cap(run: RunConfig, num_prompts: int) -> BudgetConfig:
    """The test-time cap: at most floor(rho/(1+rho) * N) cloud calls over a window of N = `num_prompts`
    episodes, first come first served (paper-spec section 5.5). Every held-out evaluation uses it."""
    return BudgetConfig(mode="cap", ratio=run.budget.ratio, window=num_prompts)


def no_cloud() -> BudgetConfig:
    """A budget that admits no call: the device answers every question itself."""
    return BudgetConfig(mode="cap", ratio=0.0)


def make_env(run: RunConfig, budget: BudgetConfig | None = None, split: str = "train") -> gym.Env:
    """`DeviceCloud-v0` with the run's settings (its training budget unless `budget` is given)."""
    return gym.make("DeviceCloud-v0", **env_arguments(run, budget, split))


def make_routing_env(
    run: RunConfig,
    features: str,
    budget: BudgetConfig | None = None,
    split: str = "train",
    env_kwargs: dict[str, Any] | None = None,
) -> gym.Env:
    """`DeviceCloudRouting-v0` with the run's settings; `env_kwargs` adds routing-env arguments
    (e.g. precomputed `device_answers`, `cache_dir`)."""
    return gym.make(
        "DeviceCloudRouting-v0", **env_arguments(run, budget, split), features=features, **(env_kwargs or {})
    )


def make_eval_env(
    run: RunConfig,
    num_prompts: int,
    kind: str = "token",
    features: str = "minilm",
    env_kwargs: dict[str, Any] | None = None,
    split: str = "test",
) -> gym.Env:
    """The env of `kind` (token or routing) on held-out prompts under the test-time cap over a window of
    `num_prompts` episodes."""
    _check_env_kwargs(kind, env_kwargs)
    if kind == "routing":
        return make_routing_env(run, features, held_out_cap(run, num_prompts), split, env_kwargs)
    return make_env(run, held_out_cap(run, num_prompts), split)


def make_env_factory(
    run: RunConfig, kind: str, features: str, env_kwargs: dict[str, Any] | None = None
) -> Callable[[], gym.Env]:
    """A function making one training env of `kind` (routing or token) for the run."""
    _check_env_kwargs(kind, env_kwargs)
    if kind == "routing":
        return lambda: make_routing_env(run, features, env_kwargs=env_kwargs)
    return lambda: make_env(run)


def _check_env_kwargs(kind: str, env_kwargs: dict[str, Any] | None) -> None:
    if env_kwargs and kind != "routing":
        raise ConfigError(
            f"env_kwargs {sorted(env_kwargs)} apply to the routing env only; the token env takes its "
            "settings from the run config (env, task, device, cloud, budget)."
        )


def config_snapshot(run: RunConfig) -> dict[str, Any]:
    """The run's settings as JSON values, as checkpoints store them."""
    return json.loads(json.dumps(dataclasses.asdict(run), default=str))


def with_added_defaults(saved: Any, current: Any) -> Any:
    """`saved` (a snapshot of an older run's settings) with the fields that the dataclass `current` has
    gained since filled in with their defaults: a setting added later behaves at its default as the
    code did before it existed (a new `agent.kl_anchor`, 0, is the estimator an old run trained with)."""
    if not (dataclasses.is_dataclass(current) and isinstance(saved, dict)):
        return saved
    out = dict(saved)
    for spec in dataclasses.fields(current):
        if spec.name in out:
            out[spec.name] = with_added_defaults(out[spec.name], getattr(current, spec.name))
        elif spec.default is not dataclasses.MISSING:
            out[spec.name] = json.loads(json.dumps(spec.default, default=str))
        elif spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
            value = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
            out[spec.name] = json.loads(json.dumps(value, default=str))
    return out


def check_same_run(checkpoint: Path, saved: dict[str, Any], run: RunConfig, purpose: str = "resume") -> None:
    """Raise CheckpointError when `checkpoint` (whose state.json config is `saved`) was made with other
    settings than `run` in what `purpose` needs to match: RESUME_MUST_MATCH to resume from it,
    EVALUATE_MUST_MATCH to evaluate it as the run's result. A setting the run's code has gained since
    the checkpoint counts as its default there (`with_added_defaults`)."""
    resuming = purpose == "resume"
    now = config_snapshot(run)
    saved = with_added_defaults(saved, run)
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
