"""Tasks read from local JSONL files: MATH style (`problem`, `solution` with a \\boxed answer,
graded by math-verify) and Countdown style (`nums`, `target`, graded by the safe evaluator).

A malformed row raises `DatasetError` naming the file, the line and the expected keys.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from collab_env.errors import ConfigError, DatasetError, DependencyNotInstalled
from collab_env.tasks.base import Problem, RawProblem, Task, split_unique
from collab_env.tasks.expressions import solve_countdown
from collab_env.tasks.generators import CountdownMixin, countdown_question
from collab_env.tasks.templates import last_boxed


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-blank line; a line that is not a JSON object is an error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"dataset file {path} does not exist; set task.path (and task.test_path) to a JSONL file."
        )
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({err.msg}).") from err
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}.")
            rows.append((lineno, row))
    return rows


class JsonlTask(Task):
    """Rows from `task.path` (and `task.test_path`); one file is split by `task.test_fraction` and seed."""

    def _generate(self) -> tuple[list[RawProblem], list[RawProblem]]:
        cfg = self.config
        if not cfg.path:
            raise ConfigError(
                f"task {cfg.name!r} reads a JSONL file: set task.path (and optionally task.test_path)."
            )
        train = [self._convert(row, cfg.path, n) for n, row in read_jsonl(cfg.path)]
        if cfg.test_path:
            test = [self._convert(row, cfg.test_path, n) for n, row in read_jsonl(cfg.test_path)]
        else:
            random.Random(cfg.seed).shuffle(train)
            n_test = max(1, round(len(train) * cfg.test_fraction)) if len(train) > 1 else 0
            test, train = train[:n_test], train[n_test:]
        train, _ = split_unique(train, cfg.num_train, 0)
        test, _ = split_unique(test, cfg.num_test, 0)
        return train, test

    def _convert(self, row: dict[str, Any], path: str, lineno: int) -> RawProblem:
        raise NotImplementedError


def _require(
    row: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str, lineno: int, expected: str
) -> Any:
    if key not in row or not isinstance(row[key], kind) or isinstance(row[key], bool):
        got = "missing" if key not in row else f"a {type(row[key]).__name__}"
        raise DatasetError(f"{path}:{lineno}: key {key!r} is {got}; each row needs {expected}.")
    return row[key]


class MathJsonlTask(JsonlTask):
    """MATH-style rows: {"problem": str, "solution": str with \\boxed{answer}, optional "level"}."""

    name = "jsonl_math"
    _expected = "'problem' (text) and 'solution' (text ending in a \\boxed{} answer)"

    def _convert(self, row: dict[str, Any], path: str, lineno: int) -> RawProblem:
        problem = _require(row, "problem", str, path, lineno, self._expected)
        solution = _require(row, "solution", str, path, lineno, self._expected)
        answer = row.get("answer") if isinstance(row.get("answer"), str) else last_boxed(solution)
        if not answer:
            raise DatasetError(
                f"{path}:{lineno}: the solution has no \\boxed{{}} answer; each row needs {self._expected}."
            )
        return RawProblem(problem, answer, str(row.get("level", "")), {})

    def verify(self, problem: Problem, answer: str | None) -> bool:
        if not answer:
            return False
        try:
            from math_verify import parse, verify
        except ImportError as err:  # pragma: no cover - a dependency of the package
            raise DependencyNotInstalled("math-verify is missing: pip install math-verify") from err
        gold = parse(f"${problem.answer}$")
        given = parse(f"${answer}$")
        return bool(gold) and bool(given) and bool(verify(gold, given))

    def wrong_answer(self, problem: Problem, rng: random.Random) -> str:
        wrong = super().wrong_answer(problem, rng)
        return wrong if wrong != "no answer" else f"{problem.answer} + 1"


class CountdownJsonlTask(CountdownMixin, JsonlTask):
    """Countdown rows: {"nums": [int, ...], "target": int} (TinyZero's columns)."""

    name = "jsonl_countdown"
    _expected = "'nums' (a list of integers) and 'target' (an integer)"

    def _convert(self, row: dict[str, Any], path: str, lineno: int) -> RawProblem:
        numbers = _require(row, "nums", list, path, lineno, self._expected)
        target = _require(row, "target", int, path, lineno, self._expected)
        if not numbers or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
            raise DatasetError(
                f"{path}:{lineno}: 'nums' must be a non-empty list of integers; each row needs {self._expected}."
            )
        answer = (
            row.get("solution") if isinstance(row.get("solution"), str) else solve_countdown(numbers, target)
        )
        return RawProblem(
            countdown_question(numbers, target),
            answer or "",
            f"{len(numbers)} numbers",
            {"numbers": numbers, "target": target},
        )
