"""Stable-Baselines3 on DeviceCloud's environments (`agent=sb3_ppo`; `pip install 'devicecloud[rl]'`).

- Routing (`DeviceCloudRouting-v0`): SB3 `PPO` or sb3-contrib `MaskablePPO` with an MLP policy on
  the prompt features; MaskablePPO reads `env.action_masks()`, which masks the cloud once a `cap`
  budget is spent.
- Token level (`DeviceCloud-v0`): SB3 `PPO` whose policy is a causal LM (`TokenActorCritic`): the
  features are the LM's last hidden state at the last token of the observation, the action head is
  the LM head over the env's vocabulary plus one logit for the call-for-help action (the last
  action), and the value head is a small MLP.

Cost model of the token level: SB3 steps one token at a time and keeps no KV cache, so every step
runs the LM over the whole prefix (prompt and completion so far). An episode of T new tokens on a
prompt of P tokens costs T forwards of up to P + T tokens, O(T * (P + T)) token work and
O((P + T)^2) attention each; the PPO update runs one more forward per stored step and epoch. That
is fine for the tiny test model and for SmolLM2 on short horizons (max_new_tokens of 8 to 32);
`agent=ppo` (agents.ppo) is the batched, KV-cached way to train an LM on this env.

The helpers that build envs from a `RunConfig` and evaluate on held-out prompts under the test-time
cap are shared with `agents.tianshou`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import collab_env  # noqa: F401  (registers the environments)
from agents.checkpoint import load_parameters, trainable_tensors
from agents.config import RunConfig, register_agent
from agents.evaluation import summarize
from agents.policy import pick_device
from agents.trainer import env_arguments, make_train_env, resolve_device
from collab_env.config import BudgetConfig
from collab_env.errors import ConfigError, DependencyNotInstalled, unknown_name
from collab_env.models import load_model
from collab_env.routing_env import CLOUD_ACTION, DEVICE_ACTION, FEATURES

ENV_KINDS = ("routing", "token")
SB3_ALGOS = ("ppo", "maskable_ppo")


def require(module: str, what: str) -> ModuleType:
    """Import an optional RL library or raise DependencyNotInstalled naming the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DependencyNotInstalled(
            f"{what} needs the package {module.split('.')[0]}: pip install 'devicecloud[rl]'"
        ) from err


@dataclass
class SB3PPOConfig:
    """Stable-Baselines3 PPO on the routing or the token-level env (field names follow SB3's)."""

    name: str = "sb3_ppo"
    env: str = "routing"
    """routing (DeviceCloudRouting-v0, MLP policy) or token (DeviceCloud-v0, the device LM as policy)."""
    algo: str = "ppo"
    """ppo (stable_baselines3.PPO) or maskable_ppo (sb3_contrib.MaskablePPO, routing env only)."""
    features: str = "minilm"
    """Routing env prompt features: minilm, device (mean hidden state of the device model) or ngrams."""
    total_timesteps: int = 4096
    """Env steps to train for (one step = one prompt on the routing env, one token on the token env)."""
    n_envs: int = 4
    """Copies of the env stepped together (SB3 DummyVecEnv)."""
    n_steps: int = 128
    """Steps per env per rollout; a rollout holds n_steps * n_envs transitions."""
    batch_size: int = 64
    """Minibatch size of the PPO update."""
    n_epochs: int = 10
    """Passes over each rollout."""
    learning_rate: float = 1e-3
    gamma: float = 1.0
    """Discount; 1 because the only reward comes at the end of an episode."""
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.0
    """Entropy bonus; over the token env's ~49k actions the entropy is large, so keep it small there."""
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    normalize_advantage: bool = False
    """Standardise advantages per minibatch (SB3's default is True). Off: rewards are already in [0, 1],
    and once the router is nearly deterministic the standardisation blows the noise of near-zero
    advantages up to unit size, which can tip a good router into calling the cloud on every prompt."""
    net_arch: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layers of the routing env's policy and value MLPs."""
    num_threads: int = 1
    """CPU threads torch may use during the run (0 keeps torch's default). One is fastest for the routing
    MLP's tiny matrices, where threads spend more on synchronising than on work; raise it for env=token."""

    def __post_init__(self) -> None:
        check_common(self, "learning_rate", "clip_range")
        if self.algo not in SB3_ALGOS:
            raise unknown_name("algorithm", self.algo, SB3_ALGOS, field="agent.algo")
        if self.algo == "maskable_ppo" and self.env != "routing":
            raise ConfigError(
                "agent.algo=maskable_ppo needs agent.env=routing: only DeviceCloudRouting-v0 has "
                "action_masks()."
            )
        for name in ("total_timesteps", "n_envs", "n_steps", "batch_size", "n_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"agent.{name}={getattr(self, name)} must be at least 1.")
        if self.batch_size > self.n_steps * self.n_envs:
            raise ConfigError(
                f"agent.batch_size={self.batch_size} exceeds a rollout of n_steps * n_envs = "
                f"{self.n_steps * self.n_envs} transitions; lower batch_size or raise n_steps."
            )


def check_common(config: Any, lr_field: str, clip_field: str) -> None:
    """Checks shared by the SB3 and Tianshou agent configs (their learning-rate and clip fields differ)."""
    if config.env not in ENV_KINDS:
        raise unknown_name("env kind", config.env, ENV_KINDS, field="agent.env")
    if config.features not in FEATURES:
        raise unknown_name("feature kind", config.features, FEATURES, field="agent.features")
    for name in (lr_field, clip_field):
        if getattr(config, name) <= 0:
            raise ConfigError(f"agent.{name}={getattr(config, name)} must be positive.")
    if not 0 < config.gamma <= 1 or not 0 <= config.gae_lambda <= 1:
        raise ConfigError(
            f"agent.gamma={config.gamma} must be in (0, 1] and "
            f"agent.gae_lambda={config.gae_lambda} in [0, 1]."
        )
    if config.num_threads < 0:
        raise ConfigError(f"agent.num_threads={config.num_threads} must be 0 (torch's default) or positive.")


register_agent("sb3_ppo", SB3PPOConfig, external_trainer="agents.sb3:train")


# --- environments and evaluation (shared with agents.tianshou) ---------------------------------


def make_routing_env(
    run: RunConfig,
    features: str,
    budget: BudgetConfig | None = None,
    split: str = "train",
    env_kwargs: dict[str, Any] | None = None,
) -> gym.Env:
    """`DeviceCloudRouting-v0` with the run's task, device, cloud, reward and env settings;
    `env_kwargs` adds routing-env arguments (e.g. precomputed `device_answers`, `cache_dir`)."""
    return gym.make(
        "DeviceCloudRouting-v0", **env_arguments(run, budget, split), features=features, **(env_kwargs or {})
    )


def make_env_factory(
    run: RunConfig, kind: str, features: str, env_kwargs: dict[str, Any] | None = None
) -> Callable[[], gym.Env]:
    """A function making one training env of `kind` (routing or token) for the run."""
    check_env_kwargs(kind, env_kwargs)
    if kind == "routing":
        return lambda: make_routing_env(run, features, env_kwargs=env_kwargs)
    return lambda: make_train_env(run)


def make_eval_env(
    run: RunConfig, kind: str, features: str, num_prompts: int, env_kwargs: dict[str, Any] | None = None
) -> gym.Env:
    """The env on the test split, under the test-time cap over a window of `num_prompts` episodes."""
    check_env_kwargs(kind, env_kwargs)
    budget = BudgetConfig(mode="cap", ratio=run.budget.ratio, window=num_prompts)
    if kind == "routing":
        return make_routing_env(run, features, budget, split="test", env_kwargs=env_kwargs)
    return make_train_env(run, budget=budget, split="test")


def check_env_kwargs(kind: str, env_kwargs: dict[str, Any] | None) -> None:
    if env_kwargs and kind != "routing":
        raise ConfigError(
            f"env_kwargs {sorted(env_kwargs)} apply to the routing env only; the token env takes its "
            "settings from the run config (env, task, device, cloud, budget)."
        )


def eval_prompt_ids(env: gym.Env, count: int) -> list[int]:
    """The first `count` held-out prompts (in the task's order, which interleaves the levels)."""
    return [p.id for p in env.unwrapped.task.problems("test")][:count]


Act = Callable[[Any, int], int]
"""A policy for evaluation: (observation, prompt id) -> action."""


def run_episodes(env: gym.Env, act: Act, prompt_ids: list[int]) -> tuple[list[float], list[dict[str, Any]]]:
    """One episode per prompt, in order, in one budget window; returns final rewards and infos."""
    rewards, infos = [], []
    for index, prompt_id in enumerate(prompt_ids):
        obs, info = env.reset(options={"prompt_id": prompt_id, "reset_budget": index == 0})
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
    """`eval/` metrics of the policy `act_for(eval_env)` on the first `train.eval_prompts` held-out
    prompts under the test-time cap, plus the `baseline/` routers on the routing env."""
    env = make_eval_env(run, kind, features, run.train.eval_prompts, env_kwargs)
    prompt_ids = eval_prompt_ids(env, run.train.eval_prompts)
    metrics = episode_metrics(*run_episodes(env, act_for(env), prompt_ids), prefix="eval/")
    if kind == "routing":
        metrics.update(routing_baselines(env, prompt_ids, run.evaluate.seed))
    env.close()
    return metrics


def write_metrics(run_dir: Path, metrics: dict[str, float]) -> None:
    (run_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=1))


# --- reusing a finished fit (shared with agents.tianshou) --------------------------------------


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


# --- the causal LM as actor-critic on DeviceCloud-v0 (shared with agents.tianshou) --------------


class LMHeadWithHelp(nn.Module):
    """The LM head's logits over the env's vocabulary, then one logit for the call-for-help action.

    The help logit is a fresh linear read-out of the same hidden state, initialised to 0."""

    def __init__(self, lm_head: nn.Module, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.vocab_size = vocab_size
        self.help = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.help.weight)
        nn.init.zeros_(self.help.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = next(self.lm_head.parameters()).dtype
        # Models may pad the output vocabulary past the tokenizer's; the env's actions stop at len(tokenizer).
        vocab = self.lm_head(hidden.to(dtype))[..., : self.vocab_size].float()
        return torch.cat([vocab, self.help(hidden)], dim=-1)


class TokenActorCritic(nn.Module):
    """A causal LM as actor-critic over `DeviceCloud-v0`'s `Discrete(vocab + 1)` actions.

    `hidden(input_ids, attention_mask)` is the last hidden state at the last token of each
    right-padded observation; `policy_head` maps it to vocab + 1 logits, `value_head` to V(s).
    """

    def __init__(self, model: Any, vocab_size: int, value_hidden: int = 64) -> None:
        super().__init__()
        self.lm = model
        self.hidden_size = int(model.config.hidden_size)
        device = next(model.parameters()).device
        self.policy_head = LMHeadWithHelp(model.get_output_embeddings(), self.hidden_size, vocab_size).to(
            device
        )
        self.value_head = nn.Sequential(
            nn.Linear(self.hidden_size, value_hidden), nn.Tanh(), nn.Linear(value_hidden, 1)
        ).to(device)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # SB3 hands Box observations over as float32 and Tianshou may too: the embedding needs int64
        # (exact for ids below 2**24, far above any vocabulary).
        input_ids, attention_mask = input_ids.long(), attention_mask.long()
        lengths = attention_mask.sum(-1)
        # Observations are right-padded to the env's max_len; columns past the longest row are dead weight.
        width = max(int(lengths.max()), 1)
        out = self.lm.base_model(
            input_ids=input_ids[:, :width], attention_mask=attention_mask[:, :width], use_cache=False
        )
        last = (lengths - 1).clamp(min=0)
        return out.last_hidden_state[torch.arange(len(last), device=last.device), last].float()


def load_token_actor_critic(run: RunConfig, vocab_size: int) -> TokenActorCritic:
    """The run's device model (tiny-arith built first if needed) wrapped as `TokenActorCritic`."""
    return TokenActorCritic(load_model(resolve_device(run), device=pick_device(run.train.device)), vocab_size)


@functools.cache
def lm_policy_class() -> type:
    """SB3's `ActorCriticPolicy` with `TokenActorCritic` inside (built on first use: SB3 is optional).

    policy_kwargs: `device_config` (a DeviceConfig dict) and `vocab_size` (the env's, without help)."""
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class LMFeatures(BaseFeaturesExtractor):
        """The LM's last hidden state at the last token of the observation."""

        def __init__(self, observation_space: gym.spaces.Dict, device_config: dict, vocab_size: int) -> None:
            net = TokenActorCritic(load_model(device_config), vocab_size)
            super().__init__(observation_space, features_dim=net.hidden_size)
            self.net = net

        def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.net.hidden(observations["input_ids"], observations["attention_mask"])

    class LMActorCriticPolicy(ActorCriticPolicy):
        """Actor = LM head + help logit, critic = MLP on the same hidden state; no extra layers."""

        def __init__(
            self, *args: Any, device_config: dict | None = None, vocab_size: int = 0, **kwargs: Any
        ) -> None:
            if not device_config or vocab_size < 1:
                raise ConfigError(
                    "LMActorCriticPolicy needs policy_kwargs device_config (a DeviceConfig dict) and "
                    "vocab_size (len(env.unwrapped.tokenizer))."
                )
            kwargs.update(
                features_extractor_class=LMFeatures,
                features_extractor_kwargs={"device_config": device_config, "vocab_size": vocab_size},
                net_arch=[],  # identity mlp_extractor: the LM head reads the hidden state directly
                ortho_init=False,  # SB3's init would overwrite the pretrained weights
            )
            super().__init__(*args, **kwargs)

        def _build(self, lr_schedule: Any) -> None:
            # SB3's _build would add a fresh Linear(hidden, vocab + 1) as action_net; use the LM head instead.
            self._build_mlp_extractor()
            net = self.features_extractor.net
            self.action_net = net.policy_head
            self.value_net = net.value_head
            self.optimizer = self.optimizer_class(
                self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
            )

        @property
        def lm(self) -> nn.Module:
            return self.features_extractor.net.lm

    return LMActorCriticPolicy


# --- training --------------------------------------------------------------------------------


def build_model(run: RunConfig, env: Any) -> Any:
    """The SB3 algorithm of `run.agent` (an SB3PPOConfig) on a VecEnv, not yet trained."""
    agent: SB3PPOConfig = run.agent
    sb3 = require("stable_baselines3", "agent=sb3_ppo")
    kwargs: dict[str, Any] = {
        "n_steps": agent.n_steps,
        "batch_size": agent.batch_size,
        "n_epochs": agent.n_epochs,
        "learning_rate": agent.learning_rate,
        "gamma": agent.gamma,
        "gae_lambda": agent.gae_lambda,
        "clip_range": agent.clip_range,
        "ent_coef": agent.ent_coef,
        "vf_coef": agent.vf_coef,
        "max_grad_norm": agent.max_grad_norm,
        "normalize_advantage": agent.normalize_advantage,
        "seed": run.seed,
        "device": pick_device(run.train.device),
        "verbose": 0,
    }
    if agent.env == "token":
        kwargs["policy_kwargs"] = {
            "device_config": dataclasses.asdict(resolve_device(run)),
            "vocab_size": int(env.action_space.n) - 1,  # the last action is the call for help
        }
        return sb3.PPO(lm_policy_class(), env, **kwargs)
    kwargs["policy_kwargs"] = {"net_arch": list(agent.net_arch)}
    if agent.algo == "maskable_ppo":
        contrib = require("sb3_contrib", "agent.algo=maskable_ppo")
        return contrib.MaskablePPO("MlpPolicy", env, **kwargs)
    return sb3.PPO("MlpPolicy", env, **kwargs)


def policy_act(model: Any, env: gym.Env, masked: bool) -> Act:
    """Greedy actions of a trained SB3 model; with `masked`, the env's action masks apply."""

    def act(obs: Any, prompt_id: int) -> int:
        if masked:
            action, _ = model.predict(obs, deterministic=True, action_masks=env.unwrapped.action_masks())
        else:
            action, _ = model.predict(obs, deterministic=True)
        return int(action)

    return act


def fit(run: RunConfig, run_dir: Path, env_kwargs: dict[str, Any] | None = None) -> Callable[[gym.Env], Act]:
    """Train `agent=sb3_ppo`; returns the greedy policy for an env of the same kind (`policy_act`).

    Writes SB3's progress.csv and TensorBoard logs and the policy's weights (sb3_policy.safetensors;
    not SB3's own zip, which pickles Python objects) to `run_dir`; a finished fit of the same
    settings found there is loaded instead of trained again (`reuse_fit`).
    `env_kwargs` go to every routing env (e.g. precomputed `device_answers`)."""
    agent: SB3PPOConfig = run.agent
    require("stable_baselines3", "agent=sb3_ppo")
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import configure

    run_dir.mkdir(parents=True, exist_ok=True)
    weights, fingerprint = run_dir / "sb3_policy.safetensors", fit_fingerprint(run, env_kwargs)
    with torch_threads(agent.num_threads):
        factory = make_env_factory(run, agent.env, agent.features, env_kwargs)
        vec_env = make_vec_env(factory, n_envs=agent.n_envs, seed=run.seed)
        model = build_model(run, vec_env)
        if not reuse_fit(model.policy, weights, fingerprint):
            model.set_logger(configure(str(run_dir), ["csv", "tensorboard"]))
            model.learn(total_timesteps=agent.total_timesteps, progress_bar=run.train.progress)
            save_fit(model.policy, weights, fingerprint)
        vec_env.close()
    return lambda env: policy_act(model, env, masked=agent.algo == "maskable_ppo")


def train(run: RunConfig, run_dir: Path, env_kwargs: dict[str, Any] | None = None) -> dict[str, float]:
    """Train `agent=sb3_ppo` (`fit`), then evaluate greedily on held-out prompts under the test-time
    cap; writes final_metrics.json to `run_dir` and returns `eval/` metrics (and `baseline/`
    routers on the routing env)."""
    run_dir = Path(run_dir)
    run = dataclasses.replace(run, device=resolve_device(run))
    act_for = fit(run, run_dir, env_kwargs)
    with torch_threads(run.agent.num_threads):
        metrics = evaluate(run, run.agent.env, run.agent.features, act_for, env_kwargs)
    write_metrics(run_dir, metrics)
    return metrics
