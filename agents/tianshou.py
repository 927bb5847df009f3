"""Tianshou 2.x PPO on DeviceCloud's environments (`agent=tianshou_ppo`; `pip install 'devicecloud[rl]'`).

Written against Tianshou 2.0's Algorithm/Policy API; the v1-era examples found online (`PPOPolicy`,
`onpolicy_trainer`, `step_per_collect`) no longer run. The pieces, all in `build_algorithm` and `train`:

    policy = DiscreteActorPolicy(actor=..., action_space=env.action_space, deterministic_eval=True)
    algorithm = PPO(policy=policy, critic=..., optim=AdamOptimizerFactory(lr=...), ...)
    collector = Collector(algorithm, DummyVectorEnv([...]), VectorReplayBuffer(size, n_envs))
    algorithm.run_training(OnPolicyTrainerParams(training_collector=collector, ...))

- Routing (`DeviceCloudRouting-v0`): MLP actor and critic (Tianshou's `Net`) on the prompt features.
- Token level (`DeviceCloud-v0`): the device LM as actor-critic (agents.token_actor_critic, the same
  network as the SB3 adapter) behind `TokenActor` / `TokenCritic`, whose preprocessing casts the token
  ids to int64 (Tianshou's `Net` casts observations to float32). Same O(T^2)-per-episode cost model
  as the SB3 adapter: no KV cache, one LM forward over the whole prefix per step; the critic runs its
  own forward on each observation and on the next one.

Tianshou's vector envs do not autoreset: the Collector resets finished sub-envs itself. PPO has no
action masking in Tianshou; on the routing env a cloud call that the `cap` budget refuses falls back
on the device's answer, so an unmasked policy stays valid.
"""

from __future__ import annotations

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
from agents.runs import make_env_factory
from agents.token_actor_critic import TokenActorCritic, load_token_actor_critic
from collab_env.errors import ConfigError


@dataclass
class TianshouPPOConfig(LibraryPPOConfig):
    """Tianshou 2.x PPO on the routing or the token-level env (field names follow Tianshou 2.0's)."""

    name: str = "tianshou_ppo"
    max_epochs: int = 4
    """Trainer epochs; an epoch is epoch_num_steps env steps."""
    epoch_num_steps: int = 1024
    """Env steps per epoch (one step = one prompt on the routing env, one token on the token env)."""
    collection_step_num_env_steps: int = 256
    """Env steps collected (over all sub-envs) before each PPO update."""
    update_step_num_repetitions: int = 10
    """Passes over each collected batch."""
    lr: float = 1e-3
    """Adam step size; 1e-3 suits the routing MLP, an LM on the token env wants ~1e-5."""
    eps_clip: float = 0.2
    advantage_normalization: bool = False
    """Standardise advantages per minibatch (Tianshou's default is True; see LibraryPPOConfig for why not)."""
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layers of the routing env's actor and critic MLPs."""

    def __post_init__(self) -> None:
        self.check("lr", "eps_clip")
        for name in (
            "max_epochs",
            "epoch_num_steps",
            "collection_step_num_env_steps",
            "update_step_num_repetitions",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"agent.{name}={getattr(self, name)} must be at least 1.")
        if self.collection_step_num_env_steps < self.n_envs:
            raise ConfigError(
                f"agent.collection_step_num_env_steps={self.collection_step_num_env_steps} must be at least "
                f"agent.n_envs={self.n_envs} (one step per sub-env per collection)."
            )


class DropInfo(gym.Wrapper):
    """Hands Tianshou empty infos: its buffer rejects the None values (read as NaN) and strings of the
    env's final info, and the agent reads nothing from them; evaluation uses the raw env."""

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, _ = self.env.reset(**kwargs)
        return obs, {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, _ = self.env.step(action)
        return obs, reward, terminated, truncated, {}


def batch_hidden(net: TokenActorCritic, obs: Any) -> torch.Tensor:
    """The LM's hidden state for a Tianshou Batch of DeviceCloud-v0 observations. This is the custom
    preprocessing: token ids and mask go in as int64 (numpy or torch), where Tianshou's `Net` would
    cast them to float32."""
    device = next(net.parameters()).device
    input_ids = torch.as_tensor(obs.input_ids, device=device).long()
    return net.hidden(input_ids, torch.as_tensor(obs.attention_mask, device=device).long())


class TokenActor(nn.Module):
    """Tianshou actor on DeviceCloud-v0: obs (Batch of input_ids, attention_mask) -> vocab + 1 logits."""

    def __init__(self, net: TokenActorCritic) -> None:
        super().__init__()
        self.net = net

    def forward(self, obs: Any, state: Any = None, info: Any = None) -> tuple[torch.Tensor, Any]:
        return self.net.policy_head(batch_hidden(self.net, obs)), state


class TokenCritic(nn.Module):
    """Tianshou critic on DeviceCloud-v0: obs -> V(s), on the actor's LM (shared weights)."""

    def __init__(self, net: TokenActorCritic) -> None:
        super().__init__()
        self.net = net

    def forward(self, obs: Any, state: Any = None, info: Any = None) -> torch.Tensor:
        return self.net.value_head(batch_hidden(self.net, obs))


def orthogonal_init(module: nn.Module, last_gain: float) -> None:
    """Orthogonal weights (gain sqrt 2, zero biases) and a `last_gain` output layer, as SB3's PPO and
    Tianshou's own PPO examples initialise them: unit-norm prompt features give unit-scale activations,
    and a small policy gain starts the router near 50/50."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    for layer in linears:
        nn.init.orthogonal_(layer.weight, gain=float(np.sqrt(2)))
        nn.init.zeros_(layer.bias)
    nn.init.orthogonal_(linears[-1].weight, gain=last_gain)


def build_algorithm(run: RunConfig, env: gym.Env) -> Any:
    """Tianshou PPO (policy, critic, optimizer factory) for `run.agent` on envs like `env`."""
    agent: TianshouPPOConfig = run.agent
    require("tianshou", "agent=tianshou_ppo")
    from tianshou.algorithm import PPO
    from tianshou.algorithm.modelfree.reinforce import DiscreteActorPolicy
    from tianshou.algorithm.optim import AdamOptimizerFactory

    if agent.env == "token":
        net = load_token_actor_critic(run, int(env.action_space.n) - 1)
        actor: nn.Module = TokenActor(net)
        critic: nn.Module = TokenCritic(net)
    else:
        from tianshou.utils.net.common import Net
        from tianshou.utils.net.discrete import DiscreteActor, DiscreteCritic

        device = pick_device(run.train.device)
        shape = env.observation_space.shape
        actor = DiscreteActor(
            preprocess_net=Net(state_shape=shape, hidden_sizes=agent.hidden_sizes, activation=nn.Tanh),
            action_shape=int(env.action_space.n),
            softmax_output=False,  # logits for the policy's Categorical(logits=...)
        )
        critic = DiscreteCritic(
            preprocess_net=Net(state_shape=shape, hidden_sizes=agent.hidden_sizes, activation=nn.Tanh)
        )
        orthogonal_init(actor, last_gain=0.01)
        orthogonal_init(critic, last_gain=1.0)
        actor, critic = actor.to(device), critic.to(device)
    policy = DiscreteActorPolicy(actor=actor, action_space=env.action_space, deterministic_eval=True)
    return PPO(
        policy=policy,
        critic=critic,
        optim=AdamOptimizerFactory(lr=agent.lr, eps=1e-5),
        eps_clip=agent.eps_clip,
        vf_coef=agent.vf_coef,
        ent_coef=agent.ent_coef,
        max_grad_norm=agent.max_grad_norm,
        advantage_normalization=agent.advantage_normalization,
        gae_lambda=agent.gae_lambda,
        gamma=agent.gamma,
    )


def observation_batch(observations: list[Any]) -> Any:
    """Tianshou's Batch of env observations (Box arrays or Dicts of them)."""
    from tianshou.data import Batch

    if isinstance(observations[0], dict):
        stacked: Any = Batch({k: np.stack([np.asarray(o[k]) for o in observations]) for k in observations[0]})
    else:
        stacked = np.stack([np.asarray(o) for o in observations])
    return Batch(obs=stacked, info=Batch())


def policy_act(policy: Any) -> Act:
    """Greedy actions of a trained Tianshou policy (`deterministic_eval`) for Box or Dict observations."""

    def act(obs: Any, prompt_id: int) -> int:
        with torch.no_grad():
            return int(policy(observation_batch([obs])).act[0])

    return act


def help_probability(policy: Any) -> Callable[[list[Any]], np.ndarray]:
    """The trained Tianshou policy's probability of the env's last action for a list of observations."""

    def probability(observations: list[Any]) -> np.ndarray:
        with torch.no_grad():
            logits = policy(observation_batch(observations)).logits
        return torch.softmax(torch.as_tensor(logits).float(), dim=-1)[:, -1].cpu().numpy()

    return probability


def learn(algorithm: Any, train_envs: Any, run: RunConfig, run_dir: Path) -> None:
    """Tianshou's on-policy trainer for `run.agent`'s epochs, logging to TensorBoard in `run_dir`."""
    agent: TianshouPPOConfig = run.agent
    from tianshou.data import Collector, CollectStats, VectorReplayBuffer
    from tianshou.trainer import OnPolicyTrainerParams
    from tianshou.utils import TensorboardLogger
    from torch.utils.tensorboard import SummaryWriter

    # On-policy: the buffer is emptied after every update, so one collection (plus the overshoot
    # of up to one step per sub-env) is all it has to hold.
    buffer = VectorReplayBuffer(agent.collection_step_num_env_steps + agent.n_envs, agent.n_envs)
    collector = Collector[CollectStats](algorithm, train_envs, buffer)
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    algorithm.run_training(
        OnPolicyTrainerParams(
            training_collector=collector,
            max_epochs=agent.max_epochs,
            epoch_num_steps=agent.epoch_num_steps,
            collection_step_num_env_steps=agent.collection_step_num_env_steps,
            update_step_num_repetitions=agent.update_step_num_repetitions,
            batch_size=agent.batch_size,
            logger=TensorboardLogger(writer),
            verbose=False,
            show_progress=run.train.progress,
        )
    )
    writer.close()


def fit(run: RunConfig, run_dir: Path, env_kwargs: dict[str, Any] | None = None) -> Fitted:
    """Train `agent=tianshou_ppo`; returns the greedy policy for an env of the same kind (`policy_act`).

    Writes TensorBoard logs and the policy's weights (tianshou_policy.safetensors) to `run_dir`; a
    finished fit of the same settings found there is loaded instead of trained again (`reuse_fit`).
    `env_kwargs` go to every routing env (e.g. precomputed `device_answers`)."""
    agent: TianshouPPOConfig = run.agent
    require("tianshou", "agent=tianshou_ppo")
    from tianshou.env import DummyVectorEnv

    run_dir.mkdir(parents=True, exist_ok=True)
    weights, fingerprint = run_dir / "tianshou_policy.safetensors", fit_fingerprint(run, env_kwargs)
    with torch_threads(agent.num_threads):
        torch.manual_seed(run.seed)
        make_env = make_env_factory(run, agent.env, agent.features, env_kwargs)
        train_envs = DummyVectorEnv([lambda: DropInfo(make_env())] * agent.n_envs)
        train_envs.seed(run.seed)
        algorithm = build_algorithm(run, train_envs.get_env_attr("unwrapped", 0)[0])
        if not reuse_fit(algorithm.policy, weights, fingerprint):
            learn(algorithm, train_envs, run, run_dir)
            save_fit(algorithm.policy, weights, fingerprint)
        train_envs.close()
        algorithm.policy.eval()
    return Fitted(lambda env: policy_act(algorithm.policy), help_probability(algorithm.policy))


def train(run: RunConfig, run_dir: Path, env_kwargs: dict[str, Any] | None = None) -> dict[str, float]:
    """Train `agent=tianshou_ppo` (`fit`), then evaluate it on held-out prompts (`fit_and_evaluate`)."""
    return fit_and_evaluate(fit, run, run_dir, env_kwargs)
