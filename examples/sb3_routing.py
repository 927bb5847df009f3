"""Train a prompt router with Stable-Baselines3 on DeviceCloudRouting-v0 and compare it with routers
that need no training, on held-out prompts under the test-time cloud cap.

The device here is scripted (right on add2, add2_carry and mul21, wrong on add3 and mul22) so the
script runs in about a minute on a CPU; drop `device_answers` to route a real device model's answers
(generated once, greedy, and cached). Prompt features: the all-MiniLM-L6-v2 embedding of the question.

    python examples/sb3_routing.py            # MaskablePPO
    python examples/sb3_routing.py --ppo      # plain PPO (a refused cloud call falls back on the device)
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
import torch
from sb3_contrib import MaskablePPO
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import collab_env  # noqa: F401  (registers DeviceCloudRouting-v0)
from collab_env.routing_env import scripted_device

TEST_PROMPTS = 200
ENV_KWARGS = {
    "task": {"name": "arithmetic", "num_train": 1000, "num_test": TEST_PROMPTS},
    "features": "minilm",
    "device_answers": scripted_device(["add2", "add2_carry", "mul21"]),
    "cloud": {"name": "simulated", "cache_path": ":memory:"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ppo", action="store_true", help="plain PPO instead of MaskablePPO")
    parser.add_argument("--steps", type=int, default=4096, help="training prompts")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 64-unit MLP: more threads only add synchronisation

    # Training: budget mode "train" counts calls without refusing them; the reward (1 for a correct
    # device answer, 0.3 for a correct cloud answer) already makes the cloud the second choice.
    train_env = make_vec_env(
        lambda: gym.make("DeviceCloudRouting-v0", budget={"mode": "train"}, **ENV_KWARGS), n_envs=4, seed=0
    )
    algo = PPO if args.ppo else MaskablePPO
    # normalize_advantage=False: rewards are already in [0, 1]; standardising the near-zero advantages
    # of an almost deterministic router amplifies noise and can flip it to calling the cloud everywhere.
    model = algo(
        "MlpPolicy", train_env, learning_rate=1e-3, n_steps=128, gamma=1.0, normalize_advantage=False, seed=0
    )
    model.learn(args.steps)

    # Test: at most 30% of the held-out prompts may reach the cloud (rho = 3/7), first come first served.
    test_env = gym.make(
        "DeviceCloudRouting-v0", budget={"mode": "cap", "window": TEST_PROMPTS}, split="test", **ENV_KWARGS
    )
    router = test_env.unwrapped
    rng = np.random.default_rng(0)

    def learned(obs: np.ndarray, prompt_id: int) -> int:
        masks = {} if args.ppo else {"action_masks": router.action_masks()}
        return int(model.predict(obs, deterministic=True, **masks)[0])

    routers = {
        algo.__name__: learned,
        "random": lambda obs, prompt_id: int(rng.integers(2)),
        "device only": lambda obs, prompt_id: 0,
        "oracle": lambda obs, prompt_id: 0 if router.device_correct(prompt_id) else 1,
    }
    for name, choose in routers.items():
        rewards, calls = [], 0
        for i, problem in enumerate(router.task.problems("test")):
            obs, _ = test_env.reset(options={"prompt_id": problem.id, "reset_budget": i == 0})
            _, reward, _, _, info = test_env.step(choose(obs, problem.id))
            rewards.append(reward)
            calls += info["called_cloud"]
        print(f"{name:12s} mean reward {np.mean(rewards):.3f}   cloud rate {calls / len(rewards):.2f}")


if __name__ == "__main__":
    main()
