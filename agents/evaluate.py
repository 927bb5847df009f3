"""Hydra entry point: `python -m agents.evaluate experiment=arithmetic_cpu [run_dir=outputs/...]`.

Compares the methods of `evaluate.methods` (agents.baselines) on held-out prompts with greedy
decoding and the test-time cloud cap. Trained methods use the runs in `<run_dir>/runs/` and train
the missing ones first (`evaluate.train_missing`). Writes report.md, results.json, pareto.png and
curves.png into `<run_dir>/report/` (run_dir defaults to outputs/<name>).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from agents.baselines import EvalContext, run_method, train_runs_first
from agents.config import RunConfig
from agents.registry import register_configs, to_objects
from agents.report import write_report

register_configs()


def evaluate(run: RunConfig, experiment_dir: Path) -> Path:
    """Run every configured method for each seed of `evaluate.seeds` (or the run's seed) and write the
    report; returns the report's path."""
    started = time.perf_counter()
    by_seed = {}
    # Where the wall time goes, method by method (training a missing run counts to its first
    # method, or to 'training (parallel)' when runs train side by side first):
    # the profile of a comparison such as the main job.
    method_seconds: dict[str, dict[str, float]] = {}
    seeds = run.evaluate.seeds or [run.seed]
    if train_runs_first(run, experiment_dir, seeds):
        # Every seed's runs trained side by side, counted once (to the first seed).
        method_seconds[str(seeds[0])] = {"training (parallel)": round(time.perf_counter() - started, 1)}
    for seed in seeds:
        ctx = EvalContext(dataclasses.replace(run, seed=seed), experiment_dir)
        by_seed[seed] = []
        method_seconds.setdefault(str(seed), {})
        for name in run.evaluate.methods:
            method_started = time.perf_counter()
            result = run_method(name, ctx)
            method_seconds[str(seed)][name] = round(time.perf_counter() - method_started, 1)
            m = result.metrics()
            print(
                f"[evaluate] seed {seed}, {result.label}: accuracy {m['accuracy']:.3f}, cloud rate "
                f"{m['cloud_rate']:.3f}, help rate {m['help_rate']:.3f}  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            by_seed[seed].append(result)
    context = {
        "name": run.name,
        "task": run.task.name,
        "device": ctx.device_config.name,
        "cloud": run.cloud.name,
        "num_prompts": len(ctx.prompt_ids),
        "split_overlap": ctx.task.overlap(),
        "ratio": run.budget.ratio,
        "share": run.budget.share,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "method_seconds": method_seconds,
        "config": dataclasses.asdict(run),
    }
    return write_report(experiment_dir / "report", by_seed, ctx.cloud_correct(ctx.prompt_ids), context)


@hydra.main(version_base=None, config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run = to_objects(cfg)
    experiment_dir = Path(run.run_dir) if run.run_dir else Path("outputs") / run.name
    report = evaluate(run, experiment_dir)
    print(report.read_text())
    print(f"[evaluate] report written to {report}")


if __name__ == "__main__":
    main()
