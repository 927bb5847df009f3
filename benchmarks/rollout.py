"""Completion tokens per second: our `hf` rollout backend against transformers `generate` and vLLM.

    python -m benchmarks.rollout                       # SmolLM2-135M, batch 32 and 128, 64 new tokens
    python -m benchmarks.rollout --threads 1 --repeats 3
    python -m benchmarks.rollout --model qwen2.5-1.5b-random --device cuda --batches 64 256

A batch of B sequences is B/G training prompts x G samples (G=8, as in training), 64 new tokens
forced (stop rules and EOS off), temperature 1.0, top-p 1.0, no top-k, in the dtype the project
picks (bf16 only where native). The engines run interleaved, round after round, in one process
(vLLM in a subprocess of its own virtual environment, engine kept up between rounds), so the
machine's load hits them alike; ratios are per round, then the median.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import gymnasium as gym
import numpy as np
import torch

import collab_env  # noqa: F401  (registers DeviceCloud-v0)
from agents.config import RolloutConfig
from agents.policy import Policy
from agents.rollout.hf import HFRollout
from benchmarks.common import (
    benchmark_parser,
    benchmark_policy,
    forward_flops_per_token,
    median,
    peak_flops,
    timed,
    train_prompt_ids,
)
from collab_env.cloud.vllm_engine import hf_overrides
from collab_env.decoding import DecodeRequest, decode_dynamic

REPO = Path(__file__).resolve().parents[1]


class VLLMWorker:
    """benchmarks/vllm_worker.py in vLLM's own environment, answering timed requests on a pipe."""

    def __init__(self, python: Path, model_dir: Path, dtype: str, threads: int, log: IO[str]) -> None:
        settings = {
            "model_dir": str(model_dir),
            "dtype": dtype,
            "seed": 0,
            "gpu_memory_utilization": 0.3,  # on CPU: the share of RAM reserved (0.92 failed to start)
            "max_model_len": 512,
            "hf_overrides": hf_overrides(model_dir),
        }
        handle, self.settings_path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(handle, "w") as out:
            json.dump(settings, out)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4"}
        if threads > 0:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "0" if threads == 1 else f"0-{threads - 1}"
        self.process = subprocess.Popen(
            [str(python), str(REPO / "benchmarks" / "vllm_worker.py"), self.settings_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            text=True,
            start_new_session=True,
        )
        self.ready_s = float(self._reply()["ready_s"])

    def _reply(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the vLLM worker exited; see its log")
        return json.loads(line)

    def generate(self, prompts: list[np.ndarray], new_tokens: int) -> tuple[float, int]:
        assert self.process.stdin is not None
        request = {"prompts": [p.tolist() for p in prompts], "new_tokens": new_tokens}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self._reply()
        return float(reply["seconds"]), int(reply["tokens"])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.unlink(self.settings_path)


def left_padded(prompts: list[np.ndarray], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.as_tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def engines(
    policy: Policy, env: gym.Env, new_tokens: int, device: str, generic: bool, worker: VLLMWorker | None
) -> dict[str, Callable[[list[np.ndarray]], tuple[float, int]]]:
    """name -> run(prompts) returning (seconds, completion tokens) for each engine compared."""
    model, pad_id = policy.model, int(policy.tokenizer.pad_token_id)

    def transformers_generate(prompts: list[np.ndarray]) -> tuple[float, int]:
        ids, mask = left_padded(prompts, pad_id, device)
        with torch.no_grad():
            seconds, out = timed(
                lambda: model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=pad_id,
                ),
                device,
            )
        return seconds, (out.shape[1] - ids.shape[1]) * len(prompts)

    def ours(prompts: list[np.ndarray]) -> tuple[float, int]:
        engine = HFRollout(policy, env, RolloutConfig(max_batch=len(prompts)))
        seconds, out = timed(lambda: engine.generate(prompts, new_tokens, False, 0, stop_rules=False), device)
        return seconds, sum(len(c) for c in out.completions)

    def ours_generic(prompts: list[np.ndarray]) -> tuple[float, int]:
        request = DecodeRequest(
            prompts,
            new_tokens,
            1.0,
            1.0,
            False,
            torch.Generator(device=device).manual_seed(0),
            policy.vocab_size,
            None,
            pad_id,
        )
        seconds, out = timed(lambda: decode_dynamic(model, request), device)
        return seconds, sum(len(c) for c in out.completions)

    runs: dict[str, Callable[[list[np.ndarray]], tuple[float, int]]] = {
        "transformers generate": transformers_generate,
        "ours (hf)": ours,
    }
    if generic:
        runs["ours, generic path"] = ours_generic
    if worker is not None:
        runs["vllm"] = lambda prompts: worker.generate(prompts, new_tokens)
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per batch size")
    parser.add_argument("--generic", action="store_true", help="also time our generic (DynamicCache) path")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args(argv)

    device, policy, device_config, info = benchmark_policy(args, "rollout benchmark")
    model = policy.model
    env = gym.make(
        "DeviceCloud-v0", device=device_config, cloud={"name": "simulated", "cache_path": ":memory:"}
    )

    worker = None
    log_path = Path(tempfile.gettempdir()) / "devicecloud-bench-vllm.log"
    if args.no_vllm:
        print("vllm: skipped (--no-vllm)")
    elif device != "cpu":
        print(
            "vllm: skipped (this benchmark runs vllm-cpu only; on a GPU install vllm and use rollout.backend=vllm)"
        )
    elif not Path(args.vllm_python).is_file():
        print(f"vllm: skipped ({args.vllm_python} does not exist; bash scripts/vllm_venv.sh makes it)")
    else:
        with log_path.open("w") as log:
            try:
                worker = VLLMWorker(
                    Path(args.vllm_python), Path(device_config.path), str(policy.dtype).removeprefix("torch."),
                    args.threads, log,
                )  # fmt: skip
                print(f"vllm: engine ready in {worker.ready_s:.0f} s (log: {log_path})")
            except RuntimeError as err:
                print(f"vllm: skipped (the engine did not start: {err}; log: {log_path})")
    runs = engines(policy, env, args.new_tokens, device, args.generic, worker)

    results: dict[str, Any] = {"info": info, "batches": {}}
    try:
        for batch in args.batches:
            ids = train_prompt_ids(env, batch // args.group_size)
            prompts = [env.unwrapped.prompt_tokens(pid) for pid in ids for _ in range(args.group_size)]
            for run in runs.values():  # warm-up: allocator, kernels, vLLM's first batch
                run(prompts[: args.group_size * 2])
            rounds: dict[str, list[float]] = {name: [] for name in runs}
            for round_index in range(args.repeats):
                for name, run in runs.items():
                    seconds, tokens = run(prompts)
                    rounds[name].append(tokens / seconds)
                    print(
                        f"   batch {batch} round {round_index + 1}: {name:<24} {tokens / seconds:8.1f} tok/s"
                    )
            results["batches"][batch] = summarize(rounds, model, prompts, args.new_tokens, device)
    finally:
        if worker is not None:
            worker.close()
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def summarize(
    rounds: dict[str, list[float]],
    model: torch.nn.Module,
    prompts: list[np.ndarray],
    new_tokens: int,
    device: str,
) -> dict[str, Any]:
    """Median tokens/s per engine, our median per-round ratio to each peer, and MFU on a GPU."""
    ours = rounds["ours (hf)"]
    summary: dict[str, Any] = {name: {"tok_s": median(values)} for name, values in rounds.items()}
    for name, values in rounds.items():
        if name != "ours (hf)":
            summary[name]["ours_over"] = median([a / b for a, b in zip(ours, values, strict=True)])
    peak = peak_flops(device)
    if peak:
        context = int(np.mean([len(p) for p in prompts])) + new_tokens // 2
        flops = forward_flops_per_token(model, context)
        for values in summary.values():
            values["mfu"] = values["tok_s"] * flops / peak
    return summary


def print_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    info = results["info"]
    print(
        f"\n{info['model']} ({info['dtype']}, {info['device']}, {info['threads']} threads), "
        f"{args.new_tokens} forced new tokens, prompts x G={args.group_size}, median of {args.repeats} rounds"
    )
    print(f"| engine | batch | tokens/s | ours / engine |{' MFU |' if 'gpu' in info else ''}")
    print(f"|---|---|---|---|{'---|' if 'gpu' in info else ''}")
    for batch, summary in results["batches"].items():
        for name, values in summary.items():
            ratio = f"{values['ours_over']:.2f}x" if "ours_over" in values else "-"
            mfu = f" {values['mfu']:.1%} |" if "mfu" in values else ""
            print(f"| {name} | {batch} | {values['tok_s']:.1f} | {ratio} |{mfu}")


if __name__ == "__main__":
    main(sys.argv[1:])
