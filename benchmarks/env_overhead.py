"""The environment's share of a training rollout, against the policy's forward passes.

    python -m benchmarks.env_overhead                    # SmolLM2-135M, batch 64 (8 prompts x G=8), 64 new tokens
    python -m benchmarks.env_overhead --threads 1 --repeats 2
    python -m benchmarks.env_overhead --model qwen2-tiny-random   # a toy policy: the worst case for the env

One run of the `hf` rollout backend as training calls it (`engine.rollout(prompt_ids, G)`: stop
rules on, sampling at temperature 1.0), with every part timed where it is called:
- env: the stop rules fed token by token while decoding (`CompletionState.feed`: EOS, the
  call-for-help marker, the end of the answer), the prompts' token ids (`env.prompt_tokens`), and
  scoring (`env.unwrapped.score_many`: stop rules again, grading, the simulated cloud, and the
  budget's `CloudBudget.record`, shown on its own line as well);
- policy: its forward passes (prefill and one per decoded token), sampling, and cache compaction;
- other: the rest of the rollout (batching, host copies, padding the batch).
Rounds after a warm-up round are summed; the share is of the rollout's wall time (target: < 5%).

The JSON (benchmarks/results/env_overhead-<model>-<UTC start>.json unless --json or --no-save) holds
the run's setting (benchmarks.common.run_setting, and the load at the end), every timed round's wall
time, completion tokens, env share and seconds per part, the median/min/max of the env share over
the rounds, and the summed figures of the table.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import gymnasium as gym

import collab_env  # noqa: F401  (registers DeviceCloud-v0)
from agents.config import RolloutConfig
from agents.rollout import hf
from benchmarks.common import (
    benchmark_parser,
    benchmark_policy,
    prompt_ids,
    save_results,
    spread,
    timed,
)
from collab_env import decoding

ENV_PARTS = ("env: stop rules while decoding", "env: prompt tokens", "env: scoring (score_many)")
POLICY_PARTS = ("policy: forward passes", "policy: sampling", "policy: cache compaction")
BUDGET = "  of which budget (CloudBudget.record)"


@contextmanager
def stopwatch(targets: list[tuple[Any, str, str]], seconds: dict[str, float]) -> Iterator[None]:
    """Wrap each `getattr(owner, name)` so the wall time spent in it adds to `seconds[part]`."""

    def timing(original: Callable[..., Any], part: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[part] += time.perf_counter() - started

        return wrapper

    # An instance attribute shadows the class's method; a class attribute is replaced and restored.
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in targets]
    for owner, name, part in targets:
        setattr(owner, name, timing(getattr(owner, name), part))
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (after one warm-up round)")
    args = parser.parse_args(argv)

    device, policy, device_config, setting = benchmark_policy(
        args, argv, "env_overhead", "env overhead benchmark"
    )
    model = policy.model
    env = gym.make(
        "DeviceCloud-v0",
        device=device_config,
        cloud={"name": "simulated", "cache_path": ":memory:"},
        max_new_tokens=args.new_tokens,
    )
    engine = hf.HFRollout(policy, env, RolloutConfig(max_batch=args.prompts * args.group_size))
    core = env.unwrapped
    # The fast path (hf.StaticKVDecoder) and the generic loop (decoding.decode_dynamic) each call the
    # stop rules and the sampler by their own module's name; a rollout takes one path or the other.
    targets = [
        *[(module, "stops", ENV_PARTS[0]) for module in (hf, decoding)],
        (core, "prompt_tokens", ENV_PARTS[1]),
        (core, "score_many", ENV_PARTS[2]),
        (core.budget, "record", BUDGET),
        (hf.StaticKVDecoder, "_forward", POLICY_PARTS[0]),
        (hf.StaticKVDecoder, "_logits", POLICY_PARTS[0]),
        (model, "forward", POLICY_PARTS[0]),  # the generic loop's forward passes
        *[(module, "sample_tokens", POLICY_PARTS[1]) for module in (hf, decoding)],
        (hf._KVCache, "select", POLICY_PARTS[2]),
    ]
    ids = prompt_ids(env, args.prompts * (args.repeats + 1))
    seconds: dict[str, float] = defaultdict(float)
    rounds: list[dict[str, Any]] = []
    for round_index in range(args.repeats + 1):
        # Fresh prompts every round: the simulated cloud and the prompt cache see each prompt once.
        batch = ids[round_index * args.prompts : (round_index + 1) * args.prompts]
        parts: dict[str, float] = defaultdict(float)
        with stopwatch(targets, parts):
            wall, rollout = timed(partial(engine.rollout, batch, args.group_size, seed=round_index), device)
        env_share = sum(parts[p] for p in ENV_PARTS) / wall
        print(
            f"   round {round_index}{' (warm-up)' if round_index == 0 else ''}: {wall:.1f} s, env {env_share:.2%}"
        )
        if round_index:
            rounds.append(
                {
                    "wall_s": wall,
                    "completion_tokens": int(rollout.completion_mask.sum()),
                    "env_share": env_share,
                    "seconds": parts,
                }
            )
            for part, value in parts.items():
                seconds[part] += value

    total = sum(r["wall_s"] for r in rounds)
    tokens = sum(r["completion_tokens"] for r in rounds)
    env_seconds = sum(seconds[p] for p in ENV_PARTS)
    forward = seconds[POLICY_PARTS[0]]
    seconds["other"] = total - env_seconds - sum(seconds[p] for p in POLICY_PARTS)
    results = {
        "setting": setting,
        "rounds": rounds,
        "env_share_spread": spread([r["env_share"] for r in rounds]),
        "seconds": dict(seconds),
        "rollout_s": total,
        "completion_tokens": tokens,
        "env_share": env_seconds / total,
        "env_over_forward": env_seconds / forward,
    }
    print(
        f"\n{setting['model']} ({setting['dtype']}, {device}, {setting['threads']} threads): {args.prompts} prompts x "
        f"G={args.group_size}, <= {args.new_tokens} new tokens, stop rules on; {args.repeats} rounds, "
        f"{tokens} completion tokens in {total:.1f} s ({tokens / total:.1f} tok/s)"
    )
    print("| part | seconds | share of rollout |")
    print("|---|---|---|")
    for part in (*ENV_PARTS, BUDGET, *POLICY_PARTS, "other"):
        print(f"| {part} | {seconds[part]:.4f} | {seconds[part] / total:.2%} |")
    print(f"| **env total** | {env_seconds:.4f} | **{env_seconds / total:.2%}** |")
    print(f"env time is {env_seconds / forward:.2%} of the policy's forward time (target: env share < 5%)")
    save_results(f"env_overhead-{args.model}", results, args)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
