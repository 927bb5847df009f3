"""A local vLLM server as the cloud: start it, run DeviceCloud-v0 episodes against it, stop it.

vLLM runs from its own virtual environment (`bash scripts/vllm_venv.sh` makes `.venv-vllm`) and
serves the embedded SmolLM2-135M-Instruct on 127.0.0.1; the environment talks to it through the
`openai` cloud oracle, as it would to any hosted API.

    bash scripts/vllm_venv.sh
    .venv/bin/python examples/vllm_server_cloud.py --episodes 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import gymnasium as gym

import collab_env  # noqa: F401  (registers DeviceCloud-v0)
from collab_env.cloud.vllm_engine import VLLMServer
from collab_env.models import smollm2_model_dir

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"), help="Python with vLLM"
    )
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64, help="completion tokens per cloud answer")
    args = parser.parse_args()

    print(f"starting vLLM from {args.python} (about 1-2 minutes on 2 CPU cores) ...", flush=True)
    started = time.monotonic()
    with VLLMServer(smollm2_model_dir(), python=args.python, model="smollm2") as server:
        print(
            f"server ready at {server.base_url} after {time.monotonic() - started:.0f} s (log: {server.log_path})"
        )
        cloud = {
            "name": "openai",
            "base_url": server.base_url,
            "model": server.model,
            "max_tokens": args.max_tokens,
            "timeout_s": 120.0,
            # A fresh cache: a server on a new port and a new run should really ask the model.
            "cache_path": str(Path(tempfile.mkdtemp()) / "answers.sqlite"),
        }
        env = gym.make("DeviceCloud-v0", cloud=cloud, budget={"mode": "none"})
        try:
            for episode in range(args.episodes):
                env.reset(seed=episode, options={"split": "test"})
                began = time.monotonic()
                _, reward, _, _, info = env.step(env.unwrapped.help_action)
                print(
                    f"episode {episode}: cloud answered {info['cloud_answer']!r} -> {info['outcome']} "
                    f"(reward {reward}, {time.monotonic() - began:.2f} s)"
                )
            print("cloud stats:", json.dumps(env.unwrapped.cloud.stats.as_dict(), indent=2))
        finally:
            env.close()


if __name__ == "__main__":
    main()
