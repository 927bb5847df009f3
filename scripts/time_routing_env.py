"""Time `gym.make("DeviceCloudRouting-v0")` with no arguments on an empty cache: make, reset, 10 steps.

    python scripts/time_routing_env.py            # a fresh temporary DEVICECLOUD_CACHE
    python scripts/time_routing_env.py --cache D  # reuse D (the cached timing)

Prints one JSON line with the seconds of each phase and torch's thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="DEVICECLOUD_CACHE to use (default: a fresh temporary directory)")
    args = parser.parse_args()
    os.environ["DEVICECLOUD_CACHE"] = args.cache or tempfile.mkdtemp(prefix="devicecloud-cache-")

    import gymnasium as gym
    import torch

    import collab_env  # noqa: F401  (registers the envs)

    start = time.perf_counter()
    env = gym.make("DeviceCloudRouting-v0")
    made = time.perf_counter()
    env.reset(seed=0)
    reset = time.perf_counter()
    for _ in range(10):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    stepped = time.perf_counter()
    print(
        json.dumps(
            {
                "cache": os.environ["DEVICECLOUD_CACHE"],
                "make_s": round(made - start, 2),
                "first_reset_s": round(reset - made, 2),
                "ten_steps_s": round(stepped - reset, 3),
                "total_s": round(stepped - start, 2),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
