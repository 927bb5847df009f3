"""The comparison report: `report.md` (one row per method), `results.json` (every number),
`pareto.png` (accuracy vs cloud rate) and `curves.png` (training reward and help rate per step).

`python -m agents.report RUN_DIR ... --labels ... --out curves.png` plots the training curves of any runs."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

from agents.baselines.context import MethodResult
from agents.tradeoff import apgr, cpt, pgr

CPT_TARGETS = (0.2, 0.5, 0.8)


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def method_table(results: list[MethodResult], cloud_correct: list[bool]) -> dict[str, dict[str, Any]]:
    """Every metric of every method, with PGR/APGR/CPT against the device-only and cloud-only points."""
    table = {r.name: r.metrics() for r in results}
    for r in results:
        uncapped = [
            c if i["called_help"] else i["local_correct"] for i, c in zip(r.infos, cloud_correct, strict=True)
        ]
        table[r.name]["accuracy_uncapped"] = sum(uncapped) / max(len(uncapped), 1)
    device = table.get("device_only", {}).get("accuracy")
    cloud = table.get("cloud_only", {}).get("accuracy")
    for r in results:
        m = table[r.name]
        if device is None or cloud is None:
            continue
        m["pgr"] = pgr(m["accuracy"], device, cloud)
        if r.curve:
            m["apgr"] = apgr(r.curve, device, cloud)
            for target in CPT_TARGETS:
                m[f"cpt{round(100 * target)}"] = cpt(r.curve, device, cloud, target)
    return table


def write_report(
    out_dir: Path, results: list[MethodResult], cloud_correct: list[bool], context: dict[str, Any]
) -> Path:
    """Write report.md, results.json and the plots into `out_dir`; returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = method_table(results, cloud_correct)
    payload = {
        "context": context,
        "methods": {r.name: {"label": r.label, "metrics": table[r.name], "curve": r.curve} for r in results},
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    plots = [p for p in (plot_pareto(out_dir, results, table), plot_curves(out_dir, results)) if p]
    lines = [
        f"# DeviceCloud report: {context.get('name', '')}",
        "",
        f"Task `{context.get('task')}`, device `{context.get('device')}`, cloud `{context.get('cloud')}`, "
        f"{context.get('num_prompts')} held-out prompts, greedy decoding, cloud budget rho = "
        f"{context.get('ratio', 0):.3f}: at most {_pct(context.get('share', 0))}% of questions reach the cloud "
        "(test-time cap, first come first served).",
        "",
        "| method | accuracy under cap % | cloud rate % | accuracy without cap % | help rate % | cond. local acc. % | PGR % | APGR % | CPT(50%) | tokens/answer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = table[r.name]
        lines.append(
            f"| {r.label} | {_pct(m['accuracy'])} | {_pct(m['cloud_rate'])} | {_pct(m['accuracy_uncapped'])} | "
            f"{_pct(m['help_rate'])} | {_pct(m['conditional_local_accuracy'])} | {_pct(m.get('pgr'))} | "
            f"{_pct(m.get('apgr'))} | {_pct(m.get('cpt50'))} | {m['tokens_per_answer']:.1f} |"
        )
    levels = list(dict.fromkeys(i["level"] for r in results for i in r.infos))
    if len(levels) > 1:
        lines += ["", "Accuracy per difficulty level, % (help rate in parentheses):", ""]
        lines.append("| method | " + " | ".join(levels) + " |")
        lines.append("|---|" + "---|" * len(levels))
        for r in results:
            m = table[r.name]
            cells = [f"{_pct(m.get(f'accuracy/{lv}'))} ({_pct(m.get(f'help_rate/{lv}'))})" for lv in levels]
            lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy counts correct final answers, from the device or the cloud. Cloud rate is the share of",
        "questions the cloud answered after the cap; help rate the share where the device (or router) asked.",
        "Conditional local accuracy is local accuracy over the questions kept on the device. PGR is the share",
        "of the device-only to cloud-only accuracy gap closed; APGR averages it over cloud rates 0-100% along",
        "a method's curve (router threshold sweep, or budget sweep); CPT(50%) is the cloud rate that closes half.",
    ]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_pareto(out_dir: Path, results: list[MethodResult], table: dict[str, dict[str, Any]]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in results:
        m = table[r.name]
        (point,) = ax.plot(100 * m["cloud_rate"], 100 * m["accuracy"], "o", markersize=8, label=r.label)
        if r.curve:
            xs, ys = zip(*sorted(r.curve), strict=True)
            ax.plot([100 * x for x in xs], [100 * y for y in ys], "-", color=point.get_color(), alpha=0.5)
    ax.set_xlabel("cloud rate (% of questions answered by the cloud)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs cloud use (points: under the cap; lines: sweeps)")
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Plot the training curves of runs side by side (reward, help rate, held-out accuracy)."
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories holding metrics.csv")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: the directory)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument(
        "--smooth", type=int, default=1, help="steps per moving average of the training curves"
    )
    parser.add_argument("--levels-out", type=Path, help="also plot each run's help rate per task level here")
    args = parser.parse_args()
    labels = args.labels or [str(run_dir) for run_dir in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        parser.error(f"{len(labels)} labels for {len(args.run_dirs)} run directories")
    missing = [str(d) for d in args.run_dirs if not (d / "metrics.csv").is_file()]
    if missing:
        parser.error(f"no metrics.csv in {', '.join(missing)}")
    runs = [(label, read_metrics(d / "metrics.csv")) for label, d in zip(labels, args.run_dirs, strict=True)]
    print(plot_training_curves(args.out, runs, args.smooth))
    if args.levels_out:
        print(plot_level_help(args.levels_out, runs, args.smooth))


if __name__ == "__main__":
    main()
