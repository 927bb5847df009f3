"""What a batch of final infos says: the paper's evaluation metrics and the training loop's `env/` metrics."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from agents.batch import Rollout


def summarize(infos: list[dict[str, Any]]) -> dict[str, float]:
    """accuracy, cloud_rate (after the cap), help_rate (before it), local accuracy, tokens per answer, per level."""
    n = max(len(infos), 1)
    local = [i for i in infos if not i["called_cloud"]]
    out = {
        "accuracy": sum(i["correct"] for i in infos) / n,
        "cloud_rate": sum(i["called_cloud"] for i in infos) / n,
        "help_rate": sum(i["called_help"] for i in infos) / n,
        "local_accuracy": sum(i["local_correct"] for i in infos) / n,
        "conditional_local_accuracy": sum(i["local_correct"] for i in local) / max(len(local), 1),
        "tokens_per_answer": sum(i["completion_tokens"] for i in infos) / n,
    }
    by_level: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for info in infos:
        by_level[info["level"]].append(info)
    if len(by_level) > 1:
        for level, items in by_level.items():
            out[f"accuracy/{level}"] = sum(i["correct"] for i in items) / len(items)
            out[f"help_rate/{level}"] = sum(i["called_help"] for i in items) / len(items)
            out[f"local_accuracy/{level}"] = sum(i["local_correct"] for i in items) / len(items)
    return out


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """`env/` metrics of a scored batch: reward, outcome fractions, help rate (overall and per task
    level, which shows whether the device learns *where* to call), completion length."""
    n = len(rollout.infos)
    outcomes = [info["outcome"] for info in rollout.infos]
    metrics = {
        "env/reward": float(rollout.rewards.mean()),
        "env/local_correct": outcomes.count("local_correct") / n,
        "env/cloud_correct": outcomes.count("cloud_correct") / n,
        "env/wrong": outcomes.count("wrong") / n,
        "env/help_rate": sum(info["called_help"] for info in rollout.infos) / n,
        "env/completion_tokens": float(rollout.completion_mask.sum(1).mean()),
    }
    calls_by_level: dict[str, list[bool]] = {}
    for info in rollout.infos:
        calls_by_level.setdefault(info["level"], []).append(info["called_help"])
    if len(calls_by_level) > 1:
        for level, calls in sorted(calls_by_level.items()):
            metrics[f"env/help_rate/{level}"] = sum(calls) / len(calls)
    return metrics
