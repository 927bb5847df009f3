"""Train a prompt router with Tianshou 2.x PPO on DeviceCloudRouting-v0, through Tianshou's 2.0
Algorithm/Policy API (v1-era examples with PPOPolicy and onpolicy_trainer no longer run).

The device is scripted (right on add2, add2_carry and mul21, wrong on add3 and mul22) so the script
runs in about a minute on a CPU; drop `device_answers` to route a real device model's answers.

    python examples/tianshou_routing.py
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from tianshou.algorithm import PPO
from tianshou.algorithm.modelfree.reinforce import DiscreteActorPolicy
from tianshou.algorithm.optim import AdamOptimizerFactory
from tianshou.data import Batch, Collector, CollectStats, VectorReplayBuffer
from tianshou.env import DummyVectorEnv
from tianshou.trainer import OnPolicyTrainerParams
from tianshou.utils.net.common import Net
from tianshou.utils.net.discrete import DiscreteActor, DiscreteCritic
from torch import nn

import collab_env  # noqa: F401  (registers DeviceCloudRouting-v0)
from agents.tianshou import DropInfo, orthogonal_init
from collab_env.routing_env import scripted_device

TEST_PROMPTS = 200
ENV_KWARGS = {
    "task": {"name": "arithmetic", "num_train": 1000, "num_test": TEST_PROMPTS},
    "features": "minilm",
    "device_answers": scripted_device(["add2", "add2_carry", "mul21"]),
    "cloud": {"name": "simulated", "cache_path": ":memory:"},
}


def main() -> None:
    torch.set_num_threads(1)  # a 64-unit MLP: more threads only add synchronisation
    torch.manual_seed(0)

    # Tianshou's buffer rejects the None and string values of the env's final info: DropInfo empties it.
    train_envs = DummyVectorEnv(
        [lambda: DropInfo(gym.make("DeviceCloudRouting-v0", budget={"mode": "train"}, **ENV_KWARGS))] * 4
    )
    train_envs.seed(0)
    test_env = gym.make(
        "DeviceCloudRouting-v0", budget={"mode": "cap", "window": TEST_PROMPTS}, split="test", **ENV_KWARGS
    )
    shape = test_env.observation_space.shape
    actor = DiscreteActor(
        preprocess_net=Net(state_shape=shape, hidden_sizes=[64, 64], activation=nn.Tanh),
        action_shape=2,
        softmax_output=False,  # logits for Categorical(logits=...)
    )
    critic = DiscreteCritic(preprocess_net=Net(state_shape=shape, hidden_sizes=[64, 64], activation=nn.Tanh))
    orthogonal_init(actor, last_gain=0.01)
    orthogonal_init(critic, last_gain=1.0)
    policy = DiscreteActorPolicy(actor=actor, action_space=test_env.action_space, deterministic_eval=True)
    algorithm = PPO(
        policy=policy,
        critic=critic,
        optim=AdamOptimizerFactory(lr=1e-3, eps=1e-5),
        gamma=1.0,
        ent_coef=0.0,
        max_grad_norm=0.5,
        # Rewards are already in [0, 1]; standardising the near-zero advantages of an almost
        # deterministic router amplifies noise and can flip it to calling the cloud everywhere.
        advantage_normalization=False,
    )
    collector = Collector[CollectStats](algorithm, train_envs, VectorReplayBuffer(260, 4))
    algorithm.run_training(
        OnPolicyTrainerParams(
            training_collector=collector,
            max_epochs=4,
            epoch_num_steps=1024,
            collection_step_num_env_steps=256,
            update_step_num_repetitions=10,
            batch_size=64,
            show_progress=False,
        )
    )

    # Held-out prompts; at most 30% of them may reach the cloud (rho = 3/7), first come first served.
    policy.eval()
    router = test_env.unwrapped
    rewards, calls = [], 0
    for i, problem in enumerate(router.task.problems("test")):
        obs, _ = test_env.reset(options={"prompt_id": problem.id, "reset_budget": i == 0})
        with torch.no_grad():
            action = int(policy(Batch(obs=obs[None], info=Batch())).act[0])
        _, reward, _, _, info = test_env.step(action)
        rewards.append(reward)
        calls += info["called_cloud"]
    print(f"Tianshou PPO  mean reward {np.mean(rewards):.3f}   cloud rate {calls / len(rewards):.2f}")


if __name__ == "__main__":
    main()
