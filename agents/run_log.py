"""Run outputs: `metrics.csv` and TensorBoard scalars per step, sample completions, a progress bar.

Metric names have namespaces: `env/` (rewards and outcomes of the rollout), `cloud/` (oracle
statistics), `loss/`, `adv/`, `train/` (grad norm, learning rate, speed), `gapg/` (filter sets),
`eval/` (held-out greedy evaluation). docs/metrics.md explains each.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # an unreadable (half-written) row is dropped


class RunLog:
    """Writes one row of metrics per step; on resume it keeps the rows up to the resumed step."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        tensorboard: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if self.csv_path.exists() and start_step > 0:
            with self.csv_path.open() as handle:
                self.rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= start_step]
        samples = self.run_dir / "samples.jsonl"
        if samples.exists():  # a resumed run repeats the steps after its checkpoint: drop their old rows
            kept = [
                line for line in samples.read_text().splitlines(keepends=True) if _step_of(line) <= start_step
            ]
            samples.write_text("".join(kept))
        self.samples = samples.open("a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=f"{self.run_dir.parent.name}/{self.run_dir.name}",  # runs may train side by side
            disable=not progress,
            mininterval=0.5 if interactive else 30.0,
            dynamic_ncols=True,
        )
        self._started = time.perf_counter()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: round(float(v), 6) for k, v in metrics.items()}}
        self.rows.append(row)
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.csv_path.with_suffix(".tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.csv_path)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        shown = {
            k.split("/")[-1]: f"{metrics[k]:.3g}"
            for k in ("env/reward", "env/help_rate", "env/local_correct")
            if k in metrics
        }
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        for sample in samples:
            self.samples.write(json.dumps({"step": step, **sample}) + "\n")
        self.samples.flush()

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        self.samples.close()
        if self.writer is not None:
            self.writer.close()
