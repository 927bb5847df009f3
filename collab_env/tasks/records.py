"""A task's prompts as records: `task_rows` (plain dicts), `to_dataset` (a Hugging Face `datasets.Dataset`
in the conversational format TRL's trainers take) and `verl_rows` (the parquet layout of verl's RL
datasets, graded by `collab_env.integrations.verl.compute_score`).

Every record carries the `prompt_id` of the env's task, so a completion can be scored by the env itself
(`env.unwrapped.score(prompt_id, completion_token_ids)`): build records from the env's own task,
`to_dataset(env.unwrapped.task, "train")`, or from `make_task` with the env's task settings.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any

from collab_env.errors import ConfigError, DependencyNotInstalled
from collab_env.tasks.base import Task

SPLITS = ("train", "validation", "test")
"""The splits a task may have, in the order `task_splits` lists them."""
DATA_SOURCE = "devicecloud/{name}"
"""verl's `data_source` of an exported task (e.g. `devicecloud/arithmetic`)."""


def require(module: str, purpose: str, extra: str = "trl") -> Any:
    """Import an optional dependency, or DependencyNotInstalled naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DependencyNotInstalled(
            f"{purpose} needs the package {module!r}: pip install 'devicecloud[{extra}]' "
            "(or `bash scripts/setup.sh`, which installs every extra)."
        ) from err


def _check(task: Task, split: str) -> None:
    if not isinstance(task, Task):
        raise ConfigError(
            f"task must be a Task (env.unwrapped.task, or collab_env.tasks.make_task(...)), got "
            f"{type(task).__name__}: the records' prompt ids are that task's."
        )
    task.problems(split)  # ConfigError for a split the task does not have


def task_splits(task: Task) -> list[str]:
    """The splits `task` has, of `SPLITS`."""
    splits = []
    for split in SPLITS:
        try:
            task.problems(split)
        except ConfigError:
            continue
        splits.append(split)
    return splits


def task_rows(task: Task, split: str = "train") -> list[dict[str, Any]]:
    """One dict per prompt of `split`: `prompt` (the device's chat messages, system + user), `answer`
    (ground truth as text), `level`, `prompt_id` (the env's id), `question` and `split`."""
    _check(task, split)
    return [
        {
            "prompt": task.messages(p),
            "answer": p.answer,
            "level": p.level,
            "prompt_id": p.id,
            "question": p.question,
            "split": p.split,
        }
        for p in task.problems(split)
    ]


def to_dataset(task: Task, split: str = "train") -> Any:
    """`datasets.Dataset` of `task_rows(task, split)`: columns prompt (conversational: a list of
    {"role", "content"} messages, which TRL renders with the model's chat template), answer, level,
    prompt_id, question, split. TRL passes the extra columns to reward functions by name."""
    datasets = require("datasets", "collab_env.tasks.to_dataset")
    return datasets.Dataset.from_list(task_rows(task, split))


def verl_rows(task: Task, split: str = "train", env: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Records in verl's RL parquet layout: `data_source`, `prompt` (chat messages), `ability`,
    `reward_model` = {"style": "rule", "ground_truth": answer}, and `extra_info` = {"split", "index",
    "prompt_id", "level", "question", "env"}, where `env` is a JSON string of the env settings
    (`task` and any of `env`: device, cloud, budget, reward, max_new_tokens, ...) that
    `collab_env.integrations.verl.compute_score` rebuilds the env from. Top-level `prompt_id`,
    `answer` and `level` repeat what TRL's `EnvReward` reads, so one file serves both trainers."""
    _check(task, split)
    settings = {**(env or {}), "task": dataclasses.asdict(task.config)}
    env_json = json.dumps(settings, sort_keys=True)
    source = DATA_SOURCE.format(name=task.config.name)
    return [
        {
            "data_source": source,
            "prompt": row["prompt"],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": row["answer"]},
            "extra_info": {
                "split": split,
                "index": index,
                "prompt_id": row["prompt_id"],
                "level": row["level"],
                "question": row["question"],
                "env": env_json,
            },
            "prompt_id": row["prompt_id"],
            "answer": row["answer"],
            "level": row["level"],
        }
        for index, row in enumerate(task_rows(task, split))
    ]
