"""Task sources. `make_task` builds one from a `TaskConfig` (or a name or dict)."""

from __future__ import annotations

from typing import Any

from collab_env.config import TaskConfig, coerce
from collab_env.errors import unknown_name
from collab_env.tasks.arithmetic import LEVELS, SURFACE, ArithmeticTask
from collab_env.tasks.base import Problem, RawProblem, Task, parse_number
from collab_env.tasks.files import CountdownJsonlTask, MathJsonlTask
from collab_env.tasks.generators import BasicArithmeticTask, ChainSumTask, CountdownTask, GsmSymbolicTask
from collab_env.tasks.records import to_dataset as to_dataset  # a task's prompts as a datasets.Dataset
from collab_env.tasks.running_total import RunningTotalTask
from collab_env.tasks.templates import HELP_MARKER, TEMPLATES, Template

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        ArithmeticTask,
        RunningTotalTask,
        ChainSumTask,
        BasicArithmeticTask,
        CountdownTask,
        GsmSymbolicTask,
        MathJsonlTask,
        CountdownJsonlTask,
    )
}


def make_task(config: TaskConfig | str | dict[str, Any] | None = None) -> Task:
    """Build the task named by `config.name`; an unknown name lists the valid ones."""
    config = coerce(TaskConfig, config, "task")
    if config.name not in TASKS:
        raise unknown_name("task", config.name, TASKS, field="task.name")
    return TASKS[config.name](config)


__all__ = [
    "HELP_MARKER",
    "LEVELS",
    "SURFACE",
    "TASKS",
    "TEMPLATES",
    "Problem",
    "RawProblem",
    "Task",
    "Template",
    "make_task",
    "parse_number",
]
