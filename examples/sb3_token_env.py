"""Stable-Baselines3 PPO on the token-level DeviceCloud-v0, with the device LM itself as the policy.

The policy (agents.sb3.lm_policy_class) reads the LM's last hidden state; its action head is the LM
head over the vocabulary plus one logit for the call-for-help action (the env's last action), and a
small MLP is the value head. SB3 casts Box observations to float32; the policy casts the token ids back
to int64 before the embedding.

Cost model: SB3 steps one token at a time without a KV cache, so each step runs the LM over the whole
prefix (prompt + completion so far): O(T^2) per episode of T tokens, plus one more forward per stored
step in every PPO epoch. Fine for the tiny random model and for SmolLM2 with a few new tokens; for real
training use `python -m agents.train agent=ppo` (batched, KV-cached rollouts).

    python examples/sb3_token_env.py                      # tiny random model, ~1 minute on a CPU
    python examples/sb3_token_env.py --device smollm2 --max-new-tokens 8 --steps 64
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import collab_env  # noqa: F401  (registers DeviceCloud-v0)
from agents.sb3 import lm_policy_class

DEVICES = {"tiny-random": {"name": "tiny-random", "dtype": "float32"}, "smollm2": {"name": "smollm2"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(DEVICES), default="tiny-random")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--steps", type=int, default=256, help="tokens to train on")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 suits the tiny model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = DEVICES[args.device]

    env = make_vec_env(
        lambda: gym.make(
            "DeviceCloud-v0",
            task={"name": "arithmetic", "num_train": 64, "num_test": 16},
            device=device,
            max_new_tokens=args.max_new_tokens,
            cloud={"name": "simulated", "cache_path": ":memory:"},
        ),
        n_envs=2,
        seed=0,
    )
    vocab_size = int(env.action_space.n) - 1  # the last action is the call for help
    model = PPO(
        lm_policy_class(),
        env,
        n_steps=32,
        batch_size=16,
        n_epochs=1,
        learning_rate=1e-5,
        gamma=1.0,
        policy_kwargs={"device_config": device, "vocab_size": vocab_size},
        seed=0,
    )
    model.learn(args.steps)
    print(", ".join(f"{k}={float(v):.3g}" for k, v in model.logger.name_to_value.items()))

    # Greedy decoding of one prompt with the trained policy, token by token through the env.
    obs = env.reset()
    done, tokens = False, []
    while not done:
        action, _ = model.predict(obs, deterministic=True)
        obs, rewards, dones, infos = env.step(action)
        tokens.append(int(action[0]))
        done = bool(dones[0])
    tokenizer = env.get_attr("tokenizer")[0]
    print("completion:", repr(tokenizer.decode([t for t in tokens if t < vocab_size])))
    print("final info:", {k: infos[0].get(k) for k in ("outcome", "called_help", "stop_reason")})


if __name__ == "__main__":
    main()
