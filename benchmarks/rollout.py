"""Completion tokens per second: our `hf` rollout backend against transformers `generate` and vLLM.

    python -m benchmarks.rollout                       # --workload train: SmolLM2-135M, G=8, batch 32 and 128
    python -m benchmarks.rollout --workload eval       # SmolLM2-135M, G=1, batch 32 and 128
    python -m benchmarks.rollout --workload main-job   # tiny-arith, 16 tokens, 16 prompts x 8 and 256 x 1
    python -m benchmarks.rollout --threads 1 --repeats 3
    python -m benchmarks.rollout --model qwen2.5-1.5b-random --device cuda --batches 64 256

Workloads (issue 19's a, b and c), each a model, a number of forced new tokens and its batches:
- `train`: SmolLM2-135M, 64 new tokens, batches of 32 and 128 rows at G=8, as GAPG trains;
- `eval`: SmolLM2-135M, 64 new tokens, batches of 32 and 128 rows at G=1, as evaluation decodes;
- `main-job`: the main CPU experiment's own device (configs/experiment/arithmetic_cpu.yaml: the
  tiny-arith model, from the cache, and the env settings of that experiment), 16 new tokens, its
  training batch (16 prompts x G=8, 128 rows) and its evaluation batch (evaluate.max_batch, 256 rows
  at G=1).
--model, --group-size, --batches and --new-tokens override the workload's values (--batches on
main-job, whose batches differ in G, needs --group-size too).

A batch of B rows at G>1 is B/G training prompts x G samples; at G=1 it is B distinct held-out
(test split) prompts. The prompts carry the chat template and instructions as the environment
writes them. New tokens are forced (stop rules and EOS off), temperature 1.0, top-p 1.0, no top-k,
in the model's configured dtype (tiny-arith float32; the others auto: bf16 only where native). The
engines run interleaved, round after round, in one process (vLLM in a subprocess of its own virtual
environment, engine kept up between rounds), so the machine's load hits them alike; ratios are per
round. The table gives the median and [min-max] over the rounds (5 by default).

The JSON (benchmarks/results/rollout-<workload>-<UTC start>.json unless --json or --no-save) holds
the run's setting (benchmarks.common.run_setting, and the load at the end), the resolved workload,
and per batch its rows, G, split and every row's prompt id, and per engine every round's tokens/s,
every round's ratio of ours to it, the median/min/max of both, and MFU on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import gymnasium as gym
import numpy as np
import torch

import collab_env  # noqa: F401  (registers DeviceCloud-v0)
from agents.config import RolloutConfig
from agents.policy import Policy
from agents.rollout.hf import HFRollout
from agents.runs import make_env
from benchmarks.common import (
    REPO,
    benchmark_parser,
    benchmark_policy,
    experiment_run,
    forward_flops_per_token,
    peak_flops,
    prompt_ids,
    save_results,
    spread,
    spread_text,
    timed,
)
from collab_env.cloud.vllm_engine import hf_overrides
from collab_env.config import DeviceConfig
from collab_env.decoding import DecodeRequest, decode_dynamic

WARMUP_ROWS = 16
"""Rows each engine decodes before a batch's timed rounds (allocator, kernels, vLLM's first batch)."""


@dataclass(frozen=True)
class Workload:
    """What a run decodes: a model, the forced new tokens and its batches."""

    model: str
    new_tokens: int
    batches: tuple[tuple[int, int], ...]
    """(rows, G) of each batch."""
    experiment: str | None = None
    """The experiment (configs/experiment/) whose env settings make the prompts; None: the env's defaults."""


WORKLOADS = {
    "train": Workload("smollm2", 64, ((32, 8), (128, 8))),
    "eval": Workload("smollm2", 64, ((32, 1), (128, 1))),
    # arithmetic_cpu's env.max_new_tokens, train.prompts_per_step x train.group_size and evaluate.max_batch
    # (tests/test_benchmarks.py checks them against the config).
    "main-job": Workload("tiny-arith", 16, ((128, 8), (256, 1)), "arithmetic_cpu"),
}


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


def resolve_workload(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[tuple[int, int]]:
    """Fill in args.model and args.new_tokens from the workload unless given; the (rows, G) of every batch."""
    workload = WORKLOADS[args.workload]
    args.model = args.model or workload.model
    args.new_tokens = workload.new_tokens if args.new_tokens is None else args.new_tokens
    batches = list(workload.batches)
    if args.batches is not None:
        if args.group_size is None and len({g for _, g in batches}) > 1:
            parser.error(f"--workload {args.workload} mixes group sizes: give --group-size with --batches")
        batches = [(rows, batches[0][1]) for rows in args.batches]
    if args.group_size is not None:
        batches = [(rows, args.group_size) for rows, _ in batches]
    for rows, group_size in batches:
        if rows % group_size:
            parser.error(f"a batch of {rows} rows is no whole number of groups of G={group_size}")
    return batches


def batch_split(group_size: int) -> str:
    """Where a batch's prompts come from: training prompts in groups, or held-out ones at G=1 as
    evaluation decodes them."""
    return "train" if group_size > 1 else "test"


def row_prompt_ids(env: gym.Env, rows: int, group_size: int) -> list[int]:
    """The prompt id of every row: rows/G prompts of the batch's split, each G times in a row."""
    ids = prompt_ids(env, rows // group_size, batch_split(group_size))
    return [pid for pid in ids for _ in range(group_size)]


def make_bench_env(experiment: str | None, device_config: DeviceConfig) -> gym.Env:
    """DeviceCloud-v0 on `device_config` with an experiment's settings, or the env's defaults."""
    if experiment is None:
        return gym.make(
            "DeviceCloud-v0", device=device_config, cloud={"name": "simulated", "cache_path": ":memory:"}
        )
    return make_env(dataclasses.replace(experiment_run(experiment), device=device_config))


def rollout_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--workload", default="train", choices=list(WORKLOADS))
    parser.add_argument("--batches", type=int, nargs="+", help="rows per batch (default: the workload's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per batch size")
    parser.add_argument("--generic", action="store_true", help="also time our generic (DynamicCache) path")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--no-vllm", action="store_true")
    # None: the workload's value.
    parser.set_defaults(model=None, group_size=None, new_tokens=None)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = rollout_parser()
    args = parser.parse_args(argv)
    batches = resolve_workload(args, parser)

    device, policy, device_config, setting = benchmark_policy(args, argv, "rollout", "rollout benchmark")
    model = policy.model
    env = make_bench_env(WORKLOADS[args.workload].experiment, device_config)

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

    results: dict[str, Any] = {
        "setting": setting,
        "workload": {
            "name": args.workload,
            "model": args.model,
            "new_tokens": args.new_tokens,
            "batches": batches,
            "repeats": args.repeats,
        },
        "batches": [],
    }
    try:
        for rows, group_size in batches:
            ids = row_prompt_ids(env, rows, group_size)
            prompts = [env.unwrapped.prompt_tokens(pid) for pid in ids]
            for run in runs.values():
                run(prompts[:WARMUP_ROWS])
            rounds: dict[str, list[float]] = {name: [] for name in runs}
            for round_index in range(args.repeats):
                for name, run in runs.items():
                    seconds, tokens = run(prompts)
                    rounds[name].append(tokens / seconds)
                    print(
                        f"   batch {rows} (G={group_size}) round {round_index + 1}: "
                        f"{name:<24} {tokens / seconds:8.1f} tok/s"
                    )
            results["batches"].append(
                {
                    "rows": rows,
                    "group_size": group_size,
                    "split": batch_split(group_size),
                    "row_prompt_ids": ids,
                    "engines": summarize(rounds, model, prompts, args.new_tokens, device),
                }
            )
    finally:
        if worker is not None:
            worker.close()
    print_table(results)
    save_results(f"rollout-{args.workload}", results, args)
    return results


def summarize(
    rounds: dict[str, list[float]],
    model: torch.nn.Module,
    prompts: list[np.ndarray],
    new_tokens: int,
    device: str,
) -> dict[str, Any]:
    """Per engine: every round's tokens/s and their median/min/max, every round's ratio of ours to it
    and their median/min/max, and the MFU of the median on a GPU."""
    ours = rounds["ours (hf)"]
    summary: dict[str, Any] = {}
    for name, values in rounds.items():
        summary[name] = {"tok_s_rounds": values, "tok_s": spread(values)}
        if name != "ours (hf)":
            ratios = [a / b for a, b in zip(ours, values, strict=True)]
            summary[name] |= {"ours_over_rounds": ratios, "ours_over": spread(ratios)}
    peak = peak_flops(device)
    if peak:
        context = int(np.mean([len(p) for p in prompts])) + new_tokens // 2
        flops = forward_flops_per_token(model, context)
        for values in summary.values():
            values["mfu"] = values["tok_s"]["median"] * flops / peak
    return summary


def print_table(results: dict[str, Any]) -> None:
    setting, workload = results["setting"], results["workload"]
    print(
        f"\n{setting['model']} ({setting['dtype']}, {setting['device']}, {setting['threads']} threads), "
        f"workload {workload['name']}: {workload['new_tokens']} forced new tokens; "
        f"median [min-max] of {workload['repeats']} rounds"
    )
    gpu = "gpu" in setting
    print(f"| engine | batch | G | tokens/s | ours / engine |{' MFU |' if gpu else ''}")
    print(f"|---|---|---|---|---|{'---|' if gpu else ''}")
    for batch in results["batches"]:
        for name, values in batch["engines"].items():
            tok_s = values["tok_s"]
            speed = spread_text(tok_s, "{:.1f}")
            ratio = "-"
            if "ours_over" in values:
                over = values["ours_over"]
                ratio = spread_text(over, unit="x")
            mfu = f" {values['mfu']:.1%} |" if "mfu" in values else ""
            print(f"| {name} | {batch['rows']} | {batch['group_size']} | {speed} | {ratio} |{mfu}")


if __name__ == "__main__":
    main(sys.argv[1:])
