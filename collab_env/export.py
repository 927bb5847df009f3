"""Write a task's prompts as parquet files for other trainers (verl, TRL, anything that reads parquet).

    python -m collab_env.export task=arithmetic --out data/arithmetic
    python -m collab_env.export task=countdown task.num_train=2000 max_new_tokens=256 --out data/countdown

Writes `<out>/<split>.parquet` for every split of the task (train, test; validation where the task
has one), one row per prompt, in verl's RL layout
(`collab_env.tasks.records.verl_rows`): `data_source` ("devicecloud/<task>"), `prompt` (chat messages),
`ability`, `reward_model` {style, ground_truth}, `extra_info` {split, index, prompt_id, level,
question, env}, plus top-level `prompt_id`, `answer` and `level` columns, so the same file is a TRL
dataset for `collab_env.integrations.trl.EnvReward`. Point verl's `custom_reward_function.path` at
`collab_env/integrations/verl.py` (name `compute_score`). Arguments are `key=value` overrides of the
`DeviceCloud-v0` arguments the rows record: `task` / `task.<field>`, `device`, `cloud`, `budget`,
`reward`, `max_new_tokens`, `max_prompt_tokens`, `marker_match`; `splits=[train]` limits the splits.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from collab_env.config import TaskConfig, coerce
from collab_env.env import DeviceCloudEnv
from collab_env.errors import ConfigError
from collab_env.tasks import make_task
from collab_env.tasks.records import require, task_splits, verl_rows

ENV_KEYS = (
    "task",
    "device",
    "cloud",
    "budget",
    "reward",
    "max_new_tokens",
    "max_prompt_tokens",
    "marker_match",
)
"""The `DeviceCloud-v0` arguments an export records (and `compute_score` rebuilds the env from)."""


def export(
    out: str | Path,
    task: Any = "arithmetic",
    env: dict[str, Any] | None = None,
    splits: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write `<out>/<split>.parquet` for each split (None: every split the task has); returns split -> path.

    `env` holds other `DeviceCloud-v0` arguments (device, cloud, budget, reward, max_new_tokens, ...),
    recorded in every row's `extra_info.env`. The settings are checked by building the env once (with
    an in-memory simulated cloud) and tokenizing every prompt, so a prompt longer than
    `max_prompt_tokens` fails here rather than in the trainer."""
    datasets = require("datasets", "python -m collab_env.export")
    env = dict(env or {})
    unknown = sorted(set(env) - set(ENV_KEYS))
    if unknown:
        raise ConfigError(f"unknown env setting(s) {unknown}; use {', '.join(ENV_KEYS)}.")
    built = make_task(coerce(TaskConfig, task, "task"))
    splits = task_splits(built) if splits is None else list(splits)
    for split in splits:
        built.problems(split)  # ConfigError for a split the task does not have
    check = {k: v for k, v in env.items() if k != "cloud"}
    check_env = DeviceCloudEnv(
        task=built.config, cloud={"name": "simulated", "cache_path": ":memory:"}, **check
    )
    check_env.check_prompts()
    check_env.close()
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in splits:
        path = folder / f"{split}.parquet"
        datasets.Dataset.from_list(verl_rows(built, split, env)).to_parquet(str(path))
        written[split] = path
    return written


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` overrides as nested settings; `task=NAME` (also device, cloud) sets `task.name`."""
    dotlist = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(
                f"argument {item!r} is not key=value (e.g. task=arithmetic task.num_train=100)."
            )
        if key in ("task", "device", "cloud") and not value.lstrip().startswith("{"):
            key = f"{key}.name"
        dotlist.append(f"{key}={value}")
    return OmegaConf.to_container(OmegaConf.from_dotlist(dotlist), resolve=True)  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(prog="python -m collab_env.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="key=value: task=arithmetic, task.num_train=100, ...")
    parser.add_argument("--out", required=True, help="directory of the parquet files")
    args = parser.parse_args(argv)
    settings = parse_overrides(args.overrides)
    task = settings.pop("task", "arithmetic")
    splits = settings.pop("splits", None)
    splits = [splits] if isinstance(splits, str) else splits
    written = export(args.out, task, settings, splits)
    summary = {split: str(path) for split, path in written.items()}
    print(json.dumps(summary, indent=2))
    return written


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        sys.exit(f"error: {err}")
