"""Stable-Baselines3 on DeviceCloud's environments (`agent=sb3_ppo`; `pip install 'devicecloud[rl]'`).

- Routing (`DeviceCloudRouting-v0`): SB3 `PPO` or sb3-contrib `MaskablePPO` with an MLP policy on
  the prompt features; MaskablePPO reads `env.action_masks()`, which masks the cloud once a `cap`
  budget is spent.
- Token level (`DeviceCloud-v0`): SB3 `PPO` whose policy is a causal LM (`TokenActorCritic`): the
  features are the LM's last hidden state at the last token of the observation, the action head is
  the LM head over the env's vocabulary plus one logit for the call-for-help action (the last
  action), and the value head is a small MLP. SB3 keeps no KV cache, so each step runs the LM over
  the whole prefix (agents.token_actor_critic states the cost); that is fine for the tiny test model
  and for SmolLM2 on short horizons (max_new_tokens of 8 to 32).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from agents.config import RunConfig
from agents.external import (
    Act,
    Fitted,
    LibraryPPOConfig,
    fit_and_evaluate,
    fit_fingerprint,
    require,
    reuse_fit,
    save_fit,
    torch_threads,
)
from agents.policy import pick_device
from agents.runs import make_env_factory, resolve_device
from agents.token_actor_critic import TokenActorCritic
from collab_env.errors import ConfigError, unknown_name
from collab_env.models import load_model

SB3_ALGOS = ("ppo", "maskable_ppo")


@dataclass
class SB3PPOConfig(LibraryPPOConfig):
    """Stable-Baselines3 PPO on the routing or the token-level env (field names follow SB3's)."""

    name: str = "sb3_ppo"
    algo: str = "ppo"
    """ppo (stable_baselines3.PPO) or maskable_ppo (sb3_contrib.MaskablePPO, routing env only)."""
    total_timesteps: int = 4096
    """Env steps to train for (one step = one prompt on the routing env, one token on the token env)."""
    n_steps: int = 128
    """Steps per env per rollout; a rollout holds n_steps * n_envs transitions."""
    n_epochs: int = 10
    """Passes over each rollout."""
    learning_rate: float = 1e-3
    clip_range: float = 0.2
    normalize_advantage: bool = False
    """Standardise advantages per minibatch (SB3's default is True; see LibraryPPOConfig for why not)."""
    net_arch: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layers of the routing env's policy and value MLPs."""

    def __post_init__(self) -> None:
        self.check("learning_rate", "clip_range")
        if self.algo not in SB3_ALGOS:
            raise unknown_name("algorithm", self.algo, SB3_ALGOS, field="agent.algo")
        if self.algo == "maskable_ppo" and self.env != "routing":
            raise ConfigError(
                "agent.algo=maskable_ppo needs agent.env=routing: only DeviceCloudRouting-v0 has "
                "action_masks()."
            )
        for name in ("total_timesteps", "n_steps", "n_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"agent.{name}={getattr(self, name)} must be at least 1.")
        if self.batch_size > self.n_steps * self.n_envs:
            raise ConfigError(
                f"agent.batch_size={self.batch_size} exceeds a rollout of n_steps * n_envs = "
                f"{self.n_steps * self.n_envs} transitions; lower batch_size or raise n_steps."
            )


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


# --- training --------------------------------------------------------------------------------------


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


def help_probability(model: Any) -> Callable[[list[Any]], np.ndarray]:
    """The trained SB3 policy's probability of the env's last action for a list of observations."""

    def probability(observations: list[Any]) -> np.ndarray:
        if isinstance(observations[0], dict):
            batch: Any = {k: np.stack([o[k] for o in observations]) for k in observations[0]}
        else:
            batch = np.stack(observations)
        with torch.no_grad():
            tensor, _ = model.policy.obs_to_tensor(batch)
            probs = model.policy.get_distribution(tensor).distribution.probs
        return probs[:, -1].cpu().numpy()

    return probability


def fit(run: RunConfig, run_dir: Path, env_kwargs: dict[str, Any] | None = None) -> Fitted:
    """Train `agent=sb3_ppo`; returns its greedy policy for an env of the same kind (`policy_act`).

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
    return Fitted(
        lambda env: policy_act(model, env, masked=agent.algo == "maskable_ppo"), help_probability(model)
    )


def train(run: RunConfig, run_dir: Path, env_kwargs: dict[str, Any] | None = None) -> dict[str, float]:
    """Train `agent=sb3_ppo` (`fit`), then evaluate it on held-out prompts (`fit_and_evaluate`)."""
    return fit_and_evaluate(fit, run, run_dir, env_kwargs)
