"""What the Stable-Baselines3 and Tianshou adapters share: optional imports, config checks, running
greedy episodes on held-out prompts under the test-time cap, and reusing a finished fit.

An adapter provides `fit(run, run_dir, env_kwargs) -> Fitted` (train, or load a finished fit of the
same settings; greedy actions for an env and action probabilities); `fit_and_evaluate` turns that into the
`train(run, run_dir)` that `python -m agents.train agent=sb3_ppo|tianshou_ppo` runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from agents.checkpoint import load_parameters, trainable_tensors
from agents.config import RunConfig
from agents.metrics import summarize
from agents.runs import ENV_KINDS, make_eval_env, resolve_device
from collab_env.errors import ConfigError, DependencyNotInstalled, unknown_name
from collab_env.features import FEATURES
from collab_env.routing_env import CLOUD_ACTION, DEVICE_ACTION
from collab_env.tasks import make_task

Act = Callable[[Any, int], int]
"""A policy for evaluation: (observation, prompt id) -> action."""


@dataclass(frozen=True)
class Fitted:
    """What an adapter's `fit` returns: the trained policy's greedy actions on an env, and its
    probability of the env's last action (the cloud on the routing env, the help action on the token
    env) for a list of observations, which orders prompts along its accuracy-vs-cloud-rate curve."""

    act_for: Callable[[gym.Env], Act]
    help_probability: Callable[[list[Any]], np.ndarray]


Fit = Callable[[RunConfig, Path, "dict[str, Any] | None"], Fitted]
"""An adapter's `fit(run, run_dir, env_kwargs)`: train, or reload a finished fit of the same settings."""


def require(module: str, what: str) -> ModuleType:
    """Import an optional RL library or raise DependencyNotInstalled naming the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DependencyNotInstalled(
            f"{what} needs the package {module.split('.')[0]}: pip install 'devicecloud[rl]'"
        ) from err


@dataclass
class LibraryPPOConfig:
    """Settings the Stable-Baselines3 and Tianshou PPO agents share; each adds its library's own names.

    Both turn the libraries' per-minibatch advantage standardisation off (their default is on): rewards
    are already in [0, 1], and once a router is nearly deterministic the standardisation blows the noise
    of near-zero advantages up to unit size, which can tip a good router into calling on every prompt.
    """

    name: str = ""
    env: str = "routing"
    """routing (DeviceCloudRouting-v0, MLP networks on the prompt features) or token (DeviceCloud-v0, the
    device LM as actor-critic)."""
    features: str = "minilm"
    """Routing env prompt features: minilm, device (mean hidden state of the device model) or ngrams."""
    n_envs: int = 4
    """Copies of the env stepped together (the library's dummy vector env)."""
    batch_size: int = 64
    """Minibatch size of the PPO update."""
    gamma: float = 1.0
    """Discount; 1 because the only reward comes at the end of an episode."""
    gae_lambda: float = 0.95
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    """Entropy bonus; over the token env's ~49k actions the entropy is large, so keep it small there."""
    max_grad_norm: float = 0.5
    num_threads: int = 1
    """CPU threads torch may use during the run (0 keeps torch's default). One is fastest for the routing
    MLP's tiny matrices, where threads spend more on synchronising than on work; raise it for env=token."""

    def check(self, lr_field: str, clip_field: str) -> None:
        """The shared checks (the libraries name their learning-rate and clip fields differently)."""
        if self.env not in ENV_KINDS:
            raise unknown_name("env kind", self.env, ENV_KINDS, field="agent.env")
        if self.features not in FEATURES:
            raise unknown_name("feature kind", self.features, FEATURES, field="agent.features")
        for name in (lr_field, clip_field):
            if getattr(self, name) <= 0:
                raise ConfigError(f"agent.{name}={getattr(self, name)} must be positive.")
        if not 0 < self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ConfigError(
                f"agent.gamma={self.gamma} must be in (0, 1] and agent.gae_lambda={self.gae_lambda} in [0, 1]."
            )
        if self.num_threads < 0:
            raise ConfigError(
                f"agent.num_threads={self.num_threads} must be 0 (torch's default) or positive."
            )
        for name in ("n_envs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"agent.{name}={getattr(self, name)} must be at least 1.")


# --- held-out episodes under the test-time cap ----------------------------------------------------


def run_episodes(
    env: gym.Env, act: Act, prompt_ids: list[int], first_observations: list[Any] | None = None
) -> tuple[list[float], list[dict[str, Any]]]:
    """One episode per prompt, in order, in one budget window; returns final rewards and infos (and
    appends each episode's first observation to `first_observations` when given)."""
    rewards, infos = [], []
    for index, prompt_id in enumerate(prompt_ids):
        obs, info = env.reset(options={"prompt_id": prompt_id, "reset_budget": index == 0})
        if first_observations is not None:
            first_observations.append(obs)
        done = False
        while not done:
            obs, reward, terminated, truncated, info = env.step(act(obs, prompt_id))
            done = terminated or truncated
        rewards.append(float(reward))
        infos.append(info)
    return rewards, infos


def episode_metrics(rewards: list[float], infos: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """Mean reward plus `agents.evaluation.summarize` (accuracy, cloud rate, per level), prefixed."""
    return {
        f"{prefix}reward": float(np.mean(rewards)),
        **{f"{prefix}{k}": v for k, v in summarize(infos).items()},
    }


def routing_baselines(env: gym.Env, prompt_ids: list[int], seed: int) -> dict[str, float]:
    """Reward, accuracy and cloud rate of reference routers on the same prompts and budget:
    random (uniform over the two actions), device_only, and oracle (the cloud for exactly the
    prompts the device gets wrong; the cap still refuses calls past the budget)."""
    rng = np.random.default_rng(seed)
    routers: dict[str, Act] = {
        "random": lambda obs, pid: int(rng.integers(2)),
        "device_only": lambda obs, pid: DEVICE_ACTION,
        "oracle": lambda obs, pid: DEVICE_ACTION if env.unwrapped.device_correct(pid) else CLOUD_ACTION,
    }
    out = {}
    for name, act in routers.items():
        metrics = episode_metrics(*run_episodes(env, act, prompt_ids), prefix="")
        out.update({f"baseline/{name}/{k}": metrics[k] for k in ("reward", "accuracy", "cloud_rate")})
    return out


def evaluate(
    run: RunConfig,
    kind: str,
    features: str,
    act_for: Callable[[gym.Env], Act],
    env_kwargs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """`eval/` metrics of the policy `act_for(eval_env)` on the first `train.eval_prompts` validation
    prompts under the test-time cap, plus the `baseline/` routers on the routing env (the test split is
    kept for `python -m agents.evaluate`)."""
    prompt_ids = [p.id for p in make_task(run.task).problems("validation")][: run.train.eval_prompts]
    env = make_eval_env(run, len(prompt_ids), kind, features, env_kwargs, split="validation")
    metrics = episode_metrics(*run_episodes(env, act_for(env), prompt_ids), prefix="eval/")
    if kind == "routing":
        metrics.update(routing_baselines(env, prompt_ids, run.evaluate.seed))
    env.close()
    return metrics


def write_metrics(run_dir: Path, metrics: dict[str, float]) -> None:
    (run_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=1))


def fit_and_evaluate(
    fit: Fit, run: RunConfig, run_dir: Path, env_kwargs: dict[str, Any] | None = None
) -> dict[str, float]:
    """Train with `fit` (or reuse a finished fit), then evaluate greedily on held-out prompts under the
    test-time cap; writes final_metrics.json to `run_dir` and returns `eval/` metrics (and `baseline/`
    routers on the routing env)."""
    run_dir = Path(run_dir)
    run = dataclasses.replace(run, device=resolve_device(run))
    fitted = fit(run, run_dir, env_kwargs)
    with torch_threads(run.agent.num_threads):
        metrics = evaluate(run, run.agent.env, run.agent.features, fitted.act_for, env_kwargs)
    write_metrics(run_dir, metrics)
    return metrics


# --- reusing a finished fit ------------------------------------------------------------------------


def fit_fingerprint(run: RunConfig, env_kwargs: dict[str, Any] | None) -> str:
    """A digest of everything a fit depends on: the run's settings (but for evaluation and display
    ones) and the routing env's arguments, such as the device answers it routes."""
    settings = dataclasses.asdict(run)
    settings.pop("evaluate")
    settings["train"].pop("progress")
    blob = json.dumps({"run": settings, "env_kwargs": env_kwargs or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def reuse_fit(module: nn.Module, weights: Path, fingerprint: str) -> bool:
    """Load into `module` the weights that a finished fit with the same fingerprint saved at `weights`.

    False, with nothing loaded, when there is none: never fitted, fitted with other settings, killed
    before it finished, or unreadable. Deleting the run directory forces a new fit."""
    stamp = weights.with_suffix(".json")
    if not (weights.is_file() and stamp.is_file()):
        return False
    if json.loads(stamp.read_text()).get("fingerprint") != fingerprint:
        stamp.unlink()  # the next save is of other settings; never pair it with this stamp
        return False
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError):
        return False
    load_parameters(module, tensors, weights)
    print(f"[fit] reusing the finished fit of the same settings in {weights.parent}", flush=True)
    return True


def save_fit(module: nn.Module, weights: Path, fingerprint: str) -> None:
    """Save a finished fit's trainable weights (safetensors) and, after them, its fingerprint."""
    save_file(trainable_tensors(module), str(weights))
    weights.with_suffix(".json").write_text(json.dumps({"fingerprint": fingerprint}))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's CPU thread count set to `count` inside the block (0 leaves it), restored afterwards."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
