"""The comparison report: `report.md` (one row per method), `results.json` (every number the report
shows), `pareto.png` (accuracy vs cloud rate), `curves.png` (training reward and help rate per step),
`call_rates.png` (each help-option run's training call rate, side by side) and, for a task with worked
steps, `call_positions.png` (where in its trace each policy calls; agents.call_position). Routers that
report their right/wrong classification (`router/test_accuracy`, `router/test_auc`) get a table of it.

With several seeds (`evaluate.seeds`) every number is the mean over seeds with its min-max, and each
method's accuracy difference to GAPG gets a paired bootstrap 95% interval over prompts (per-prompt
correctness averaged over seeds).

`python -m agents.report RUN_DIR ... --labels ... --out curves.png` plots the training curves of any runs."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from agents.baselines.context import MethodResult
from agents.call_position import call_positions, position_lines, task_from_context
from agents.plots import (
    plot_call_positions,
    plot_curves,
    plot_help_option_curves,
    plot_level_help,
    plot_pareto,
    plot_training_curves,
    read_metrics,
)
from agents.tradeoff import apgr, cpt, paired_bootstrap, pgr
from collab_env.tasks import Task

CPT_TARGETS = (0.2, 0.5, 0.8)
REFERENCE = "gapg"
"""The method every other is compared with (the paper's)."""

ROUTER_KEYS = ("router/test_accuracy", "router/test_auc")
"""A router's classification of held-out prompts as ones its device gets wrong: accuracy at 0.5, ROC AUC."""

CAP_RULE = (
    "A call the cap refuses is answered by the device on its own: a router keeps the device's answer, "
    "a policy that asked answers again greedily with the help action banned."
)


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def method_table(results: list[MethodResult], cloud_correct: list[bool]) -> dict[str, dict[str, Any]]:
    """Every metric of every method of one seed. PGR / APGR / CPT are measured twice: against the common
    device-only point (the headline) and against the method's own device answering alone (`_own`)."""
    table = {r.name: r.metrics() for r in results}
    for r in results:
        uncapped = [
            c if i["called_help"] else i["local_correct"] for i, c in zip(r.infos, cloud_correct, strict=True)
        ]
        table[r.name]["accuracy_uncapped"] = sum(uncapped) / max(len(uncapped), 1)
    device = table.get("device_only", {}).get("accuracy")
    cloud = table.get("cloud_only", {}).get("accuracy")
    if device is None or cloud is None:
        return table
    for r in results:
        m = table[r.name]
        for suffix, start in (("", device), ("_own", r.alone_accuracy)):
            if start is None:
                continue
            m[f"pgr{suffix}"] = pgr(m["accuracy"], start, cloud)
            if r.curve:
                m[f"apgr{suffix}"] = apgr(r.curve, start, cloud)
                for target in CPT_TARGETS:
                    m[f"cpt{round(100 * target)}{suffix}"] = cpt(r.curve, start, cloud, target)
        if r.alone_accuracy is not None:
            m["alone_accuracy"] = r.alone_accuracy
    return table


def across_seeds(tables: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, min and max over seeds of every metric a method has in every seed's table."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in tables[0]:
        keys = [k for k in tables[0][name] if all(k in t.get(name, {}) for t in tables)]
        out[name] = {}
        for key in keys:
            values = [float(t[name][key]) for t in tables]
            out[name][key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return out


def differences_to_reference(by_seed: dict[int, list[MethodResult]]) -> dict[str, dict[str, float]]:
    """Each method's accuracy minus GAPG's on the same prompts: mean and paired bootstrap 95% interval."""
    correct: dict[str, list[float]] = {}
    for results in by_seed.values():
        for r in results:
            scores = [float(i["correct"]) for i in r.infos]
            total = correct.setdefault(r.name, [0.0] * len(scores))
            correct[r.name] = [t + v / len(by_seed) for t, v in zip(total, scores, strict=True)]
    if REFERENCE not in correct:
        return {}
    out = {}
    for name, scores in correct.items():
        mean, low, high = paired_bootstrap(scores, correct[REFERENCE])
        out[name] = {"mean": mean, "low": low, "high": high}
    return out


def _cell(stats: dict[str, dict[str, float]], key: str, seeds: int) -> str:
    if key not in stats:
        return "–"
    value = stats[key]
    text = _pct(value["mean"])
    return f"{text} [{_pct(value['min'])}–{_pct(value['max'])}]" if seeds > 1 and text != "–" else text


def router_lines(results: list[MethodResult], means: dict[str, dict[str, float]]) -> list[str]:
    """The table of the routers' right/wrong classification, for routers that report it."""
    rows = [r for r in results if all(k in means[r.name] for k in ROUTER_KEYS)]
    if not rows:
        return []
    lines = [
        "",
        "Routers' right/wrong classification on held-out prompts: how well each router tells the prompts its",
        "device gets wrong from those it gets right (accuracy at a 0.5 score; ROC AUC, 0.5 = chance; the",
        "majority guess is the accuracy of always predicting the more common outcome), mean over seeds.",
        "",
        "| router | test accuracy % | test AUC | majority guess % | train accuracy % |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        m = means[r.name]
        local = m["local_accuracy"]
        lines.append(
            f"| {r.label} | {_pct(m['router/test_accuracy'])} | {m['router/test_auc']:.3f} | "
            f"{_pct(max(local, 1 - local))} | {_pct(m.get('router/train_accuracy'))} |"
        )
    return lines


def time_lines(context: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Where the comparison's wall time went, per method over all seeds (a missing run trained on the
    way counts to the method that needed it first, runs trained side by side to 'training (parallel)')."""
    per_seed = context.get("method_seconds")
    if not per_seed:
        return []
    totals: dict[str, float] = {}
    for seconds in per_seed.values():
        for name, value in seconds.items():
            totals[name] = totals.get(name, 0.0) + value
    lines = ["", f"Wall time {context.get('wall_time_s', 0) / 60:.1f} min; per method, all seeds:", ""]
    lines += ["| method | seconds |", "|---|---|"]
    lines += [f"| {labels.get(name, name)} | {value:.0f} |" for name, value in totals.items()]
    return lines


def write_report(
    out_dir: Path,
    by_seed: dict[int, list[MethodResult]],
    cloud_correct: list[bool],
    context: dict[str, Any],
    task: Task | None = None,
) -> Path:
    """Write report.md, results.json and the plots into `out_dir`; returns the report's path. `task`
    (default: rebuilt from `context["config"]["task"]` when its class writes worked steps) places each
    policy's calls in its trace."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = sorted(by_seed)
    tables = [method_table(by_seed[s], cloud_correct) for s in seeds]
    stats = across_seeds(tables)
    differences = differences_to_reference(by_seed)
    first = by_seed[seeds[0]]
    labels = {r.name: r.label for r in first}
    task = task or task_from_context(context)
    positions = call_positions(by_seed, task) if task is not None else {}
    payload = {
        "context": {**context, "seeds": seeds, "cap_rule": CAP_RULE},
        "methods": {
            r.name: {
                "label": r.label,
                "metrics": {k: v["mean"] for k, v in stats[r.name].items()},
                "spread": {k: [v["min"], v["max"]] for k, v in stats[r.name].items()},
                "per_seed": {str(s): t[r.name] for s, t in zip(seeds, tables, strict=True)},
                "difference_to_gapg": differences.get(r.name),
                "curve": r.curve,
                "curves_per_seed": {
                    str(s): next(x.curve for x in by_seed[s] if x.name == r.name) for s in seeds
                },
                "sweep_points": r.sweep_points,
            }
            for r in first
        },
        "call_positions": {name: c.as_dict() for name, c in positions.items()},
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    means = {name: {k: v["mean"] for k, v in s.items()} for name, s in stats.items()}
    curves = (
        plot_pareto(out_dir, first, means),
        plot_curves(out_dir, first),
        plot_help_option_curves(out_dir, first),
    )
    plots = [p for p in curves if p]
    if positions:
        plot_call_positions(out_dir / "call_positions.png", positions, labels)
    n = len(seeds)
    lines = [
        f"# DeviceCloud report: {context.get('name', '')}",
        "",
        f"Task `{context.get('task')}`, device `{context.get('device')}`, cloud `{context.get('cloud')}`, "
        f"{context.get('num_prompts')} held-out prompts, greedy decoding, cloud budget rho = "
        f"{context.get('ratio', 0):.3f}: at most {_pct(context.get('share', 0))}% of questions reach the cloud "
        f"(test-time cap, first come first served). {CAP_RULE}",
        "",
        f"Seeds: {n} ({', '.join(map(str, seeds))})"
        + (": each cell is the mean over seeds [min–max]." if n > 1 else "; no spread over seeds.")
        + " PGR, APGR and CPT count from the common untrained device-only point (headline) and, marked"
        " 'own', from the method's own device answering every question itself. 'vs GAPG' is the accuracy"
        " difference to GAPG on the same prompts with its paired bootstrap 95% interval.",
        "",
        "| method | accuracy under cap % | vs GAPG (95% CI) | cloud rate % | help rate % | cond. local acc. % | "
        "PGR % | PGR own % | APGR % | APGR own % | CPT(50%) | tokens/answer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in first:
        s = stats[r.name]
        d = differences.get(r.name)
        versus = (
            "–"
            if d is None or r.name == REFERENCE
            else (f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]")
        )
        cells = [
            _cell(s, k, n) for k in ("accuracy", "cloud_rate", "help_rate", "conditional_local_accuracy")
        ]
        scores = [_cell(s, k, n) for k in ("pgr", "pgr_own", "apgr", "apgr_own", "cpt50")]
        tokens = s["tokens_per_answer"]["mean"]
        lines.append(
            f"| {r.label} | {cells[0]} | {versus} | {' | '.join(cells[1:])} | {' | '.join(scores)} | {tokens:.1f} |"
        )
    levels = list(dict.fromkeys(i["level"] for r in first for i in r.infos))
    if len(levels) > 1:
        lines += ["", "Accuracy per difficulty level, % (help rate in parentheses), mean over seeds:", ""]
        lines.append("| method | " + " | ".join(levels) + " |")
        lines.append("|---|" + "---|" * len(levels))
        for r in first:
            m = means[r.name]
            cells = [f"{_pct(m.get(f'accuracy/{lv}'))} ({_pct(m.get(f'help_rate/{lv}'))})" for lv in levels]
            lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy counts correct final answers, from the device or the cloud. Cloud rate is the share of",
        "questions the cloud answered after the cap; help rate the share where the device (or router) asked.",
        "Conditional local accuracy is local accuracy over the questions kept on the device. PGR is the share",
        "of the device-only to cloud-only accuracy gap closed; APGR averages it over cloud rates 0-100% along",
        "a method's curve (a router's threshold sweep; a trained policy's sweep of a bias on its help action's",
        "logit); CPT(50%) is the cloud rate that closes half.",
    ]
    lines += router_lines(first, means)
    lines += time_lines(context, labels)
    lines += position_lines(positions, labels, "call_positions.png")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
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
