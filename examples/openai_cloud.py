"""DeviceCloud-v0 with a real cloud: any OpenAI-compatible chat-completions server.

The device "asks for help" on every episode, so each question goes to the cloud (once: answers
are cached in SQLite), and the script prints how each episode ended and what the cloud cost.

    export OPENAI_API_KEY=...          # only for servers that need a key
    python examples/openai_cloud.py --base-url https://api.openai.com/v1 --model gpt-4o-mini \\
        --api-key-env OPENAI_API_KEY --episodes 5
    python examples/openai_cloud.py --base-url http://127.0.0.1:8000/v1 --model smollm2   # local vLLM
"""

from __future__ import annotations

import argparse
import json

import gymnasium as gym

import collab_env  # noqa: F401  (registers DeviceCloud-v0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="server root up to and including /v1")
    parser.add_argument("--model", required=True, help="model name the server serves")
    parser.add_argument("--api-key-env", default=None, help="environment variable holding the API key")
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--cache-path", default=None, help="SQLite answer cache (default: the user cache)")
    parser.add_argument("--on-error", choices=("raise", "score_wrong"), default="raise")
    args = parser.parse_args()

    cloud = {
        "name": "openai",
        "base_url": args.base_url,
        "model": args.model,
        "api_key_env": args.api_key_env,
        "cache_path": args.cache_path,
        "on_error": args.on_error,
    }
    # budget mode "none" counts calls without capping them: every episode here asks the cloud.
    env = gym.make("DeviceCloud-v0", cloud=cloud, budget={"mode": "none"})
    try:
        for episode in range(args.episodes):
            env.reset(seed=episode, options={"split": "test"})
            _, reward, _, _, info = env.step(env.unwrapped.help_action)
            question = env.unwrapped.task.problem(info["prompt_id"]).question
            print(
                f"{question!r}: cloud answered {info['cloud_answer']!r} -> {info['outcome']} (reward {reward})"
            )
        print("cloud stats:", json.dumps(env.unwrapped.cloud.stats.as_dict(), indent=2))
    finally:
        env.close()


if __name__ == "__main__":
    main()
