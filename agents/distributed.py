"""Data-parallel training with torch.distributed: each rank rolls out its share of the prompts, every
rank prepares the same gathered batch, and the gradients of each rank's rows are summed.

Launched by torchrun (`torchrun --nproc-per-node 2 -m agents.train ...`), which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them everything here is a no-op and a
run is exactly the single-process run. gloo on CPU, NCCL on GPUs (one GPU per rank).

Why gather the rollouts rather than average per-rank gradients: the algorithms normalise over the
whole batch (GAPG divides by the number of kept prompts, which the filter decides per batch; GRPO
by the number of sequences), so every rank runs `prepare` on the full batch, identically, and
learns from a disjoint share of its rows; the summed gradient is then the single-process gradient
of the same batch, up to the order of floating-point additions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from agents.batch import Rollout

BUCKET_ELEMENTS = 1 << 25
"""Gradient elements per all-reduce (128 MiB in fp32): fewer calls, bounded extra memory."""


def launched() -> bool:
    """Whether torchrun (or another launcher) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 logs, evaluates and writes checkpoints."""
    return rank() == 0


def init(device: str) -> str:
    """Join the process group when launched for several processes; returns this rank's device.

    Each rank uses the GPU of its LOCAL_RANK; the backend is NCCL on GPUs and gloo on CPU.
    """
    if not launched() or active():
        return _local_device(device)
    device = _local_device(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return device


def _local_device(device: str) -> str:
    if device == "cuda" and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def shard(items: list[Any]) -> list[Any]:
    """This rank's contiguous share of `items` (sizes differ by at most one), so the gathered
    shares come back in the original order."""
    size, index = world_size(), rank()
    base, extra = divmod(len(items), size)
    start = index * base + min(index, extra)
    return items[start : start + base + (index < extra)]


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers."""
    if not active():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients over ranks in place, in flat buckets (a missing gradient counts as zero)."""
    if not active():
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    filled = 0
    for p in params:
        bucket.append(p.grad)
        filled += p.grad.numel()
        if filled >= BUCKET_ELEMENTS:
            _reduce_bucket(bucket)
            bucket, filled = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_metrics(metrics: dict[str, float], device: str) -> dict[str, float]:
    """Each metric summed over ranks (a rank without a metric adds 0)."""
    if not active():
        return metrics
    keys: list[list[str]] = [[] for _ in range(world_size())]
    dist.all_gather_object(keys, sorted(metrics))
    names = sorted(set().union(*keys))
    values = torch.tensor([metrics.get(k, 0.0) for k in names], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(names, values.tolist(), strict=True))


def gather_rollout(rollout: Rollout, pad_id: int) -> Rollout:
    """Every rank's rollout, concatenated in rank order (so in the order of the unsharded prompts)."""
    if not active():
        return rollout
    parts: list[Rollout | None] = [None] * world_size()
    dist.all_gather_object(parts, rollout)
    return concat_rollouts([p for p in parts if p is not None], pad_id)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts laid out as one: prompts left-padded and completions right-padded to common widths."""
    prompt_width = max(p.input_ids.shape[1] - p.completion_len for p in parts)
    completion_width = max(p.completion_len for p in parts)

    def widen(part: Rollout, tensor: torch.Tensor, value: float) -> torch.Tensor:
        """`tensor` (N, prompt + completion) or (N, completion) padded to the common widths."""
        left = prompt_width - (part.input_ids.shape[1] - part.completion_len)
        if tensor.shape[1] == part.completion_len:
            left = 0
        right = completion_width - part.completion_len
        return torch.nn.functional.pad(tensor, (left, right), value=value)

    offsets = [0]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + part.num_prompts)
    extras: dict[str, torch.Tensor] = {}
    for key in parts[0].extras:
        values = [p.extras[key] for p in parts]
        if values[0].dim() == 2:
            values = [widen(p, v, 0.0) for p, v in zip(parts, values, strict=True)]
        extras[key] = torch.cat(values)
    return Rollout(
        prompt_ids=[pid for p in parts for pid in p.prompt_ids],
        groups=torch.cat([p.groups + offset for p, offset in zip(parts, offsets, strict=True)]),
        group_size=parts[0].group_size,
        input_ids=torch.cat([widen(p, p.input_ids, pad_id) for p in parts]),
        attention_mask=torch.cat([widen(p, p.attention_mask, 0) for p in parts]),
        completion_mask=torch.cat([widen(p, p.completion_mask, 0.0) for p in parts]),
        old_logprobs=torch.cat([widen(p, p.old_logprobs, 0.0) for p in parts]),
        rewards=torch.cat([p.rewards for p in parts]),
        infos=[info for p in parts for info in p.infos],
        extras=extras,
    )


class QuietLog:
    """What ranks other than 0 log to: nothing (rank 0 writes metrics, samples and checkpoints)."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        del step, metrics

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        del step, samples

    def close(self) -> None:
        pass
