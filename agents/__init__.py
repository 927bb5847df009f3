"""DeviceCloud's learning side: rollouts, GAPG / GRPO / PPO, baselines, training and evaluation.

It uses `collab_env` only through its public API (gym.make, env.unwrapped.score_many, ...).
"""
