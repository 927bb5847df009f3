"""Tasks read from local JSONL files: MATH style (`problem`, `solution` with a \\boxed answer,
graded by math-verify) and Countdown style (`nums`, `target`, graded by the safe evaluator).

A malformed row raises `DatasetError` naming the file, the line and the expected keys.
"""

from __future__ import annotations

import json
import random
import re
import reprlib
import threading
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
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                # A byte-order mark (files saved by some editors) is not part of the first row.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DatasetError(
                    f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8."
                ) from err
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


MAX_MATH_ANSWER_CHARS = 256
"""Longer answers are graded wrong unparsed: MATH answers are short, and parsing cost grows with the text."""
MAX_MATH_NESTING = 12
"""Deeper bracket nesting is graded wrong unparsed (MATH answers nest a few levels at most)."""

_UNSAFE_MATH = re.compile(
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"  # control characters: no answer has them, logs should not get them
    r"|\^\s*\{[^{}]*\^\s*\{"  # a braced power inside a braced exponent (9^{9^{9}}): sympy would evaluate it
    r"|\^\s*\{?\s*\d{5,}"  # an exponent of five or more digits (10^{10000000000})
)


def plausible_math(answer: str | None) -> bool:
    """Whether an answer may go to math-verify at all.

    Answers come from the device and from the cloud, and neither is trusted: an exponent tower makes
    sympy compute for as long as the parser's timeout allows (5 s, and forever outside the main
    thread, where that timeout cannot work), and math-verify logs unparsable text verbatim."""
    if not answer or len(answer) > MAX_MATH_ANSWER_CHARS or _UNSAFE_MATH.search(answer):
        return False
    depth = deepest = 0
    for char in answer:  # deeply nested brackets made the parser run into its timeout
        depth += (char in "([{") - (char in ")]}")
        deepest = max(deepest, depth)
    return deepest <= MAX_MATH_NESTING


def _timeout() -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may use; elsewhere it raises.
    return 5 if threading.current_thread() is threading.main_thread() else None


_PARSED: dict[str, tuple[Any, ...]] = {}
_PARSED_MAX = 65536


def _parse_math(answer: str) -> tuple[Any, ...]:
    """math-verify's parse of `$answer$`, kept when it succeeds (ground truths are parsed once per process).

    A failed parse is not kept: the first parse imports the LaTeX grammar under the same timeout, and
    a loaded machine could otherwise turn one slow start into a ground truth that never parses."""
    if answer in _PARSED:
        return _PARSED[answer]
    from math_verify import parse

    parsed = tuple(parse(f"${answer}$", parsing_timeout=_timeout()))
    if parsed and len(_PARSED) < _PARSED_MAX:
        _PARSED[answer] = parsed
    return parsed


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
        return RawProblem(problem, answer, str(row.get("level", "")), {"source": f"{path}:{lineno}"})

    def ground_truth_ok(self, problem: Problem) -> bool:
        # Parsing every ground truth at load takes seconds per thousand rows; `verify` parses lazily.
        return plausible_math(problem.answer)

    def verify(self, problem: Problem, answer: str | None) -> bool:
        """math-verify's equivalence; an answer it should not be shown (see `plausible_math`) is wrong.

        A ground truth math-verify cannot parse raises DatasetError naming its row: grading every
        answer to it wrong would go unnoticed."""
        if not plausible_math(answer):
            return False
        try:
            from math_verify import verify
        except ImportError as err:  # pragma: no cover - a dependency of the package
            raise DependencyNotInstalled("math-verify is missing: pip install math-verify") from err
        gold = _parse_math(problem.answer)
        if not gold:
            where = problem.data.get("source", f"prompt {problem.id}")
            raise DatasetError(
                f"{where}: math-verify cannot parse the ground-truth answer {reprlib.repr(problem.answer)}, "
                "so no answer to it could be graded right; fix or remove that row."
            )
        given = _parse_math(answer)
        return bool(given) and bool(verify(list(gold), list(given), timeout_seconds=_timeout()))

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
