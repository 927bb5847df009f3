"""The report's pictures: accuracy against cloud use (pareto.png), training curves of any runs
(curves.png), each help-option run's call rate side by side (call_rates.png), where in its trace a
policy calls (call_positions.png) and the help rate per task level."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from agents.baselines.context import MethodResult
from agents.call_position import PRECEDES, CallPositions


def plot_pareto(out_dir: Path, results: list[MethodResult], table: dict[str, dict[str, Any]]) -> Path | None:
    """Each method's point under the cap, its curve without the cap (from its own device answering
    alone at 0% calls), and its budget-sweep runs as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.get_cmap("tab20").colors  # one color per method (the default cycle repeats after 10)
    for index, r in enumerate(results):
        m = table[r.name]
        (point,) = ax.plot(
            100 * m["cloud_rate"],
            100 * m["accuracy"],
            "o",
            markersize=8,
            label=r.label,
            color=colors[index % 20],
        )
        start = [] if r.alone_accuracy is None else [(0.0, r.alone_accuracy)]
        if r.curve:
            xs, ys = zip(*sorted([*start, *r.curve]), strict=True)
            ax.plot([100 * x for x in xs], [100 * y for y in ys], "-", color=point.get_color(), alpha=0.5)
        for x, y in r.sweep_points:
            ax.plot(100 * x, 100 * y, "x", color=point.get_color())
    ax.set_xlabel("cloud rate (% of questions answered by the cloud)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs cloud use (points: under the cap; lines: without it)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    path = out_dir / "pareto.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_metrics(path: Path) -> list[dict[str, float]]:
    with path.open() as handle:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)
        ]


def plot_curves(out_dir: Path, results: list[MethodResult]) -> Path | None:
    runs = [
        (r.label, read_metrics(r.training_metrics))
        for r in results
        if r.training_metrics and r.training_metrics.exists()
    ]
    return plot_training_curves(out_dir / "curves.png", runs) if runs else None


def help_option_runs(results: list[MethodResult]) -> list[tuple[str, list[dict[str, float]]]]:
    """(label, metrics.csv rows) of every trained method whose run had the help option: its run directory
    `<agent>-<template>/seed<S>` (agents.baselines.trained) is not of the `plain` template."""
    return [
        (r.label, read_metrics(r.training_metrics))
        for r in results
        if r.training_metrics
        and r.training_metrics.exists()
        and not r.training_metrics.parent.parent.name.endswith("-plain")
    ]


def plot_help_option_curves(out_dir: Path, results: list[MethodResult]) -> Path | None:
    """call_rates.png: `plot_call_rates` of every trained help-option method that has a run."""
    runs = help_option_runs(results)
    return plot_call_rates(out_dir / "call_rates.png", runs) if runs else None


def plot_call_rates(path: Path, runs: list[tuple[str, list[dict[str, float]]]]) -> Path:
    """One panel per run, side by side on a shared axis: its training help (call) rate per step, and its
    held-out help and cloud rates at each evaluation step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.6), squeeze=False, sharey=True)
    for ax, (label, rows) in zip(axes[0], runs, strict=True):
        steps = [r["step"] for r in rows]
        ax.plot(steps, [100 * r.get("env/help_rate", math.nan) for r in rows], label="training help rate")
        for key, name in (
            ("eval/help_rate", "held-out help rate"),
            ("eval/cloud_rate", "held-out cloud rate"),
        ):
            points = [(r["step"], 100 * r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), "o--", label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("calls (% of completions)")
    axes[0][0].set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_call_positions(path: Path, positions: dict[str, CallPositions], labels: dict[str, str]) -> Path:
    """Histogram of the call position (steps written before the marker), one group of bars per method,
    each bar its share of the method's calls, stacked by what the last written step was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = max(max(c.max_steps, *c.by_position) for c in positions.values()) + 1
    width = 0.8 / len(positions)
    colors = {"none": "tab:gray", "right": "tab:green", "wrong": "tab:red"}
    names = {"none": "no step yet", "right": "last step right", "wrong": "last step wrong"}
    hatches = ("", "//", "..", "xx", "\\\\", "++")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * n * len(positions) ** 0.5), 4))
    for m, c in enumerate(positions.values()):
        xs = [k - 0.4 + width * (m + 0.5) for k in range(n)]
        bottom = [0.0] * n
        for kind in PRECEDES:
            heights = [100 * c.by_position.get(k, {}).get(kind, 0) / c.calls for k in range(n)]
            ax.bar(
                xs,
                heights,
                width,
                bottom=bottom,
                color=colors[kind],
                hatch=hatches[m % len(hatches)],
                edgecolor="black",
                linewidth=0.5,
            )
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(range(n))
    ax.set_xlabel("steps written before the call for help")
    ax.set_ylabel("% of the method's calls")
    ax.set_title("Where in its trace each policy calls (one hatched bar per method at each position)")
    ax.grid(alpha=0.3, axis="y")
    handles = [Patch(facecolor=colors[kind], edgecolor="black", label=names[kind]) for kind in PRECEDES]
    handles += [
        Patch(
            facecolor="white",
            edgecolor="black",
            hatch=hatches[m % len(hatches)],
            label=labels.get(name, name),
        )
        for m, name in enumerate(positions)
    ]
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def moving_average(values: list[float], window: int) -> list[float]:
    """Means over the last `window` values, from the first full window on (earlier values: nan);
    nan values (steps without the metric) are skipped within a window."""
    out = []
    for i in range(len(values)):
        present = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(present) / len(present) if i >= window - 1 and present else math.nan)
    return out


def plot_training_curves(path: Path, runs: list[tuple[str, list[dict[str, float]]]], smooth: int = 1) -> Path:
    """Training reward, training help rate and held-out accuracy per step of labelled `metrics.csv`
    rows, one line per run; `smooth` > 1 averages the training curves over that many steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, rows in runs:
        steps = [r["step"] for r in rows]
        axes[0].plot(
            steps, moving_average([r.get("env/reward", math.nan) for r in rows], smooth), label=label
        )
        axes[1].plot(
            steps, moving_average([100 * r.get("env/help_rate", math.nan) for r in rows], smooth), label=label
        )
        evals = [(r["step"], 100 * r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        if evals:
            axes[2].plot(*zip(*evals, strict=True), "o-", label=label)
    mean = f" ({smooth}-step mean)" if smooth > 1 else ""
    titles = (f"training reward{mean}", f"training help rate (%){mean}", "held-out accuracy under cap (%)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_level_help(path: Path, runs: list[tuple[str, list[dict[str, float]]]], smooth: int = 1) -> Path:
    """The training help rate of each task level (`env/help_rate/<level>`), one panel per run:
    whether a device learns *where* to call, not only how often."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for ax, (label, rows) in zip(axes[0], runs, strict=True):
        levels = sorted(
            {k.removeprefix("env/help_rate/") for r in rows for k in r if k.startswith("env/help_rate/")}
        )
        steps = [r["step"] for r in rows]
        for level in levels:
            values = [100 * r.get(f"env/help_rate/{level}", math.nan) for r in rows]
            ax.plot(steps, moving_average(values, smooth), label=level)
        ax.set_title(f"{label}: help rate per level (%)")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
