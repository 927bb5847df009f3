"""One GAPG training step against TRL's GRPOTrainer configured to the same work.

    python -m benchmarks.train_step                     # SmolLM2-135M, 8 prompts x G=8, 64 new tokens
    python -m benchmarks.train_step --steps 3 --rounds 3
    python -m benchmarks.train_step --model qwen2.5-1.5b-random --device cuda

Same model and dtype, the same 8 training prompts per step (chat template and instructions as
the environment writes them), 8 completions each, at most 64 new tokens, temperature 1.0, full
fine-tuning with AdamW at the same learning rate, betas, weight decay and clipping, micro-batches of
16 sequences, no gradient checkpointing, no vLLM, rewards from the environment's own scorer. GAPG
runs with its prompt filter off, so it learns from all 64 completions as GRPO does. Equal work
where TRL would otherwise do more: our rollout ends a completion at the environment's stop rules
(EOS, the call-for-help marker, `</answer>`), and TRL gets the same stops as `stop_strings`; TRL
computes every token's entropy only to log it, and here skips it as our step does. Both completion
lengths are printed, and tokens/s next to samples/s.

Each engine runs in a subprocess of its own (`--only ours|trl`), so peak RSS is its own, `--rounds`
times, alternating ours and TRL so that a change of load hits both; of each run the steps after the
first are reported (the first pays for allocation and warm-up). The ratios are TRL / ours per round
(per step and per completion token), then their median, min and max.

The JSON (benchmarks/results/train_step-<model>-<UTC start>.json unless --json or --no-save) holds
the run's setting (benchmarks.common.run_setting, and the load at the end) and per engine the table's
figures, the median/min/max seconds of the reported steps, and every step's seconds, completion
tokens and prompt tokens, the first step included.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import (
    MODELS,
    benchmark_parser,
    device_config,
    forward_flops_per_token,
    load_policy_model,
    median,
    peak_flops,
    pick_device,
    print_header,
    run_setting,
    save_results,
    set_threads,
    spread,
    spread_text,
)

RESULT = "@@train_step "
"""Prefix of the child's result line on stdout."""


def run_config(args: argparse.Namespace, device: str, model: Any) -> Any:
    """The RunConfig of a GAPG run doing exactly the benchmark's work (filter off, no eval, no saving)."""
    from agents.config import RolloutConfig, RunConfig, TrainConfig
    from agents.gapg import GAPGConfig
    from collab_env.config import EnvConfig, SimulatedCloudConfig

    return RunConfig(
        env=EnvConfig(max_new_tokens=args.new_tokens),
        device=model,
        cloud=SimulatedCloudConfig(cache_path=":memory:"),
        rollout=RolloutConfig(backend="hf", temperature=1.0, top_p=1.0, max_batch=256),
        agent=GAPGConfig(filtering=False),
        train=TrainConfig(
            steps=args.steps,
            prompts_per_step=args.prompts,
            group_size=args.group_size,
            lr=args.lr,
            micro_batch_size=args.micro_batch,
            max_grad_norm=1.0,
            device=device,
            resume="never",
            progress=False,
            save_every=0,
        ),
    )


def prompt_batches(env: Any, args: argparse.Namespace) -> list[list[int]]:
    """The prompt ids of every step: consecutive training prompts, the same for both engines."""
    problems = env.unwrapped.task.problems("train")
    return [[p.id for p in problems[s * args.prompts : (s + 1) * args.prompts]] for s in range(args.steps)]


def run_ours(args: argparse.Namespace, device: str) -> dict[str, Any]:
    from agents.distributed import QuietLog
    from agents.trainer import Trainer

    run = run_config(args, device, device_config(MODELS[args.model], device))

    class FixedPrompts(Trainer):
        """The shared trainer, fed the benchmark's prompts; records each rollout's token counts."""

        def prompt_batch(self, step: int) -> list[int]:
            return self.batches[step - 1]

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = FixedPrompts(run, run_dir)
        trainer.batches = prompt_batches(trainer.env, args)
        rollouts = []
        rollout = trainer.engine.rollout

        def recorded(*a: Any, **k: Any) -> Any:
            rollouts.append(out := rollout(*a, **k))
            return out

        trainer.engine.rollout = recorded
        seconds, completion_tokens, prompt_tokens = [], [], []
        for step in range(1, args.steps + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            metrics = trainer.step(step, QuietLog())
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
            completion_tokens.append(float(rollouts[-1].completion_mask.sum()))
            prompt_tokens.append(float(rollouts[-1].attention_mask.sum()) - completion_tokens[-1])
            print(
                f"   ours step {step}: {seconds[-1]:.1f} s (generate {metrics['train/generate_time']:.1f} s, "
                f"update {metrics['train/update_time']:.1f} s)",
                flush=True,
            )
        return {
            "seconds": seconds,
            "completion_tokens": completion_tokens,
            "prompt_tokens": prompt_tokens,
            "model": trainer.policy.model,
        }


def run_trl(args: argparse.Namespace, device: str) -> dict[str, Any]:
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        return {"skipped": "TRL is not installed (pip install 'devicecloud[bench]')"}
    import gymnasium as gym

    import collab_env  # noqa: F401  (registers DeviceCloud-v0)
    from collab_env.tasks.templates import HELP_MARKER

    model, tokenizer, model_config = load_policy_model(MODELS[args.model], device)
    env = gym.make(
        "DeviceCloud-v0",
        device=model_config,
        cloud={"name": "simulated", "cache_path": ":memory:"},
        max_new_tokens=args.new_tokens,
    )
    task = env.unwrapped.task
    ids = [pid for batch in prompt_batches(env, args) for pid in batch]
    dataset = Dataset.from_list(
        [{"prompt": task.messages(task.problem(pid)), "prompt_id": pid} for pid in ids]
    )

    vocab = len(tokenizer)

    class WithoutEntropy(GRPOTrainer):
        """TRL computes every token's entropy in its loss only to log it (and to mask by it, off at the
        default top_entropy_quantile=1); our step computes none, so for equal work TRL skips it too."""

        def _get_per_token_logps_and_entropies(
            self, *args: Any, compute_entropy: bool = False, **kwargs: Any
        ):
            logps, _, aux = super()._get_per_token_logps_and_entropies(*args, compute_entropy=False, **kwargs)
            return logps, torch.zeros_like(logps) if compute_entropy else None, aux

    def reward(completion_ids: list[list[int]], prompt_id: list[int], **_: Any) -> list[float]:
        # A random model's embedding rows past the tokenizer (Qwen's 151936 > SmolLM2's 49152) can be
        # sampled by TRL; they are no text, so they are dropped before scoring (our policy never samples them).
        completions = [[t for t in ids if t < vocab] for ids in completion_ids]
        return [r for r, _ in env.unwrapped.score_many(prompt_id, completions)]

    class Timing(TrainerCallback):
        """Wall time between optimizer steps and the completion lengths TRL logs."""

        def __init__(self) -> None:
            self.marks: list[float] = []
            self.lengths: list[float] = []

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self._sync()
            self.marks.append(time.perf_counter())

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self._sync()
            self.marks.append(time.perf_counter())
            print(f"   trl step {len(self.marks) - 1}: {self.marks[-1] - self.marks[-2]:.1f} s", flush=True)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()

        def on_log(self, *_: Any, logs: dict[str, float] | None = None, **__: Any) -> None:
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

        def _sync(self) -> None:
            if device.startswith("cuda"):
                torch.cuda.synchronize()

    # Equal work: TRL's generate stops at EOS only, ours also at the end of the answer and of the
    # call-for-help marker, so TRL gets the same stops as stop strings (transformers needs the
    # tokenizer for them, which TRL does not pass to `generate`).
    stop_strings = [text for text in (task.template.stop_text, HELP_MARKER.split()[-1]) if text]
    model.generate = functools.partial(model.generate, tokenizer=tokenizer)
    bf16 = model.dtype == torch.bfloat16
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="devicecloud-trl-"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.prompts * args.group_size // args.micro_batch,
        num_generations=args.group_size,
        max_completion_length=args.new_tokens,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs={"stop_strings": stop_strings},
        gradient_checkpointing=False,
        bf16=bf16,
        use_cpu=device == "cpu",
        max_steps=args.steps,
        shuffle_dataset=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
    )
    timing = Timing()
    trainer = WithoutEntropy(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timing],
    )
    trainer.train()
    seconds = [b - a for a, b in zip(timing.marks, timing.marks[1:], strict=False)]
    completion_tokens = [length * args.prompts * args.group_size for length in timing.lengths]
    prompt_len = sum(len(env.unwrapped.prompt_tokens(pid)) for pid in ids) / len(ids)
    return {
        "seconds": seconds,
        "completion_tokens": completion_tokens,
        "prompt_tokens": [prompt_len * args.prompts * args.group_size] * len(seconds),
        "model": model,
    }


def child(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    set_threads(args.threads)
    result = run_ours(args, device) if args.only == "ours" else run_trl(args, device)
    model = result.pop("model", None)
    if "skipped" not in result:
        result["peak_memory_bytes"] = (
            torch.cuda.max_memory_allocated()
            if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        context = int(median(result["prompt_tokens"]) / (args.prompts * args.group_size)) + args.new_tokens
        result["flops_per_token"] = forward_flops_per_token(model, context)
    print(RESULT + json.dumps(result), flush=True)


def summarize(
    name: str, results: list[dict[str, Any]], args: argparse.Namespace, device: str
) -> dict[str, Any]:
    """Over every round's child run of one engine: seconds per step (median of the steps after each
    run's first, and their min and max), samples/s, completion tokens/s, memory, MFU, and every
    step's raw figures."""

    def reported(key: str) -> list[float]:
        return [value for result in results for value in (result[key][1:] or result[key])]

    timed, tokens, prompts = reported("seconds"), reported("completion_tokens"), reported("prompt_tokens")
    step = median(timed)
    samples = args.prompts * args.group_size
    summary = {
        "engine": name,
        "s_per_step": step,
        "samples_per_s": samples / step,
        "completion_tokens_per_s": median([t / s for t, s in zip(tokens, timed, strict=True)]),
        "s_per_completion_token": median([s / t for t, s in zip(tokens, timed, strict=True)]),
        "mean_completion_tokens": median(tokens) / samples,
        "peak_memory_gib": max(result["peak_memory_bytes"] for result in results) / 2**30,
        "s_per_step_spread": spread(timed),
        "rounds": [
            {key: result[key] for key in ("seconds", "completion_tokens", "prompt_tokens")}
            for result in results
        ],
    }
    peak = peak_flops(device)
    if peak:
        # Generation is one forward per token (prompts and completions); learning is forward + backward
        # (3 forwards) over the same tokens.
        flops = results[0]["flops_per_token"] * 4 * (median(tokens) + median(prompts))
        summary["mfu"] = flops / step / peak
    return summary


def round_ratios(ours: dict[str, Any], trl: dict[str, Any]) -> dict[str, Any]:
    """TRL / ours per round (the two ran back to back, under the same load): per step and per
    completion token, each round's value and their median/min/max."""
    per_step, per_token = [], []
    for mine, theirs in zip(ours["rounds"], trl["rounds"], strict=True):
        mine_s, theirs_s = median(mine["seconds"][1:]), median(theirs["seconds"][1:])
        mine_t, theirs_t = median(mine["completion_tokens"][1:]), median(theirs["completion_tokens"][1:])
        per_step.append(theirs_s / mine_s)
        per_token.append((theirs_s / theirs_t) / (mine_s / mine_t))
    return {"per_step": spread(per_step), "per_completion_token": spread(per_token)}


def run_child(name: str, passed: list[str]) -> dict[str, Any]:
    """One engine's steps in a subprocess of its own (its peak RSS is its own); its result line."""
    command = [sys.executable, "-m", "benchmarks.train_step", *passed, "--only", name]
    process = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT)]
    for line in process.stdout.splitlines():
        if not line.startswith(RESULT):
            print(line)
    if process.returncode or not lines:
        raise RuntimeError(f"the {name} run failed (exit code {process.returncode})")
    return json.loads(lines[-1].removeprefix(RESULT))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument(
        "--steps", type=int, default=3, help="steps per engine run; the first is not reported"
    )
    parser.add_argument("--rounds", type=int, default=2, help="runs of each engine, alternating ours and TRL")
    parser.add_argument("--only", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:
        child(args)
        return {}

    device = pick_device(args.device)
    set_threads(args.threads)
    setting = run_setting("train_step", args, argv, device, device_config(MODELS[args.model], device))
    print_header("training-step benchmark", setting)
    passed = [
        f"--{key.replace('_', '-')}={value}"
        for key, value in vars(args).items()
        if key not in ("only", "json", "no_save", "rounds")
    ]
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
    for round_index in range(args.rounds):
        for name in runs:
            print(f"-- round {round_index + 1}/{args.rounds}: {name}", flush=True)
            result = run_child(name, passed)
            if "skipped" in result:
                print(f"{name}: skipped ({result['skipped']})")
            else:
                runs[name].append(result)
    results: dict[str, Any] = {
        "setting": setting,
        "engines": [summarize(name, done, args, device) for name, done in runs.items() if done],
    }
    if len(results["engines"]) == 2:
        results["trl_over_ours"] = round_ratios(*results["engines"])
    print_table(results, args)
    save_results(f"train_step-{args.model}", results, args)
    return results


def print_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    setting, engines = results["setting"], results["engines"]
    print(
        f"\n{setting['model']} ({setting['dtype']}, {setting['device']}, {setting['threads']} threads): "
        f"{args.prompts} prompts x G={args.group_size}, "
        f"<= {args.new_tokens} new tokens, micro-batch {args.micro_batch}; median of steps 2..{args.steps} of {args.rounds} runs per engine"
    )
    mfu = any("mfu" in e for e in engines)
    print(
        "| engine | s/step | samples/s | completion tok/s | mean completion | peak memory |"
        + (" MFU |" if mfu else "")
    )
    print("|---|---|---|---|---|---|" + ("---|" if mfu else ""))
    for e in engines:
        print(
            f"| {e['engine']} | {e['s_per_step']:.1f} | {e['samples_per_s']:.2f} | {e['completion_tokens_per_s']:.1f} "
            f"| {e['mean_completion_tokens']:.1f} | {e['peak_memory_gib']:.2f} GiB |"
            + (f" {e['mfu']:.1%} |" if "mfu" in e else "")
        )
    if "trl_over_ours" in results:
        ratios = results["trl_over_ours"]
        print(
            f"TRL / ours, median of {args.rounds} rounds [min-max]: per step {spread_text(ratios['per_step'], unit='x')}, "
            f"per completion token {spread_text(ratios['per_completion_token'], unit='x')}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
