"""The embedded default task: integer arithmetic in five difficulty levels.

The levels are chosen so that a small device model can be good at some and hopeless at others,
and so that part of the difficulty is invisible on the prompt's surface (design.md section 7):
`add2` and `add2_carry` look alike ("Calculate 47 + 38.") and differ only in whether a column
carries, which a prompt router cannot see but the device finds out by trying.

| level        | surface     | example         | what makes it hard          |
|--------------|-------------|-----------------|-----------------------------|
| `add2`       | 2d + 2d     | 23 + 45         | nothing: digit-wise sums    |
| `add2_carry` | 2d + 2d     | 27 + 45         | at least one carry (hidden) |
| `add3`       | 3d + 3d     | 487 + 365       | carries across 3 columns    |
| `mul21`      | 2d * 1d     | 47 * 8          | a product                   |
| `mul22`      | 2d * 2d     | 47 * 38         | a long product              |
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from collab_env.errors import unknown_name
from collab_env.tasks.base import Problem, RawProblem, Task


def _no_carry(a: int, b: int) -> bool:
    while a or b:
        if a % 10 + b % 10 >= 10:
            return False
        a, b = a // 10, b // 10
    return True


def _add2(rng: random.Random) -> tuple[int, str, int]:
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if _no_carry(a, b):
            return a, "+", b


def _add2_carry(rng: random.Random) -> tuple[int, str, int]:
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if not _no_carry(a, b):
            return a, "+", b


def _add3(rng: random.Random) -> tuple[int, str, int]:
    return rng.randint(100, 999), "+", rng.randint(100, 999)


def _mul21(rng: random.Random) -> tuple[int, str, int]:
    return rng.randint(10, 99), "*", rng.randint(2, 9)


def _mul22(rng: random.Random) -> tuple[int, str, int]:
    return rng.randint(10, 99), "*", rng.randint(10, 99)


LEVELS: dict[str, Callable[[random.Random], tuple[int, str, int]]] = {
    "add2": _add2,
    "add2_carry": _add2_carry,
    "add3": _add3,
    "mul21": _mul21,
    "mul22": _mul22,
}
"""Level name -> generator of (a, op, b), easiest first."""

SURFACE = {
    "add2": "2d + 2d",
    "add2_carry": "2d + 2d",
    "add3": "3d + 3d",
    "mul21": "2d * 1d",
    "mul22": "2d * 2d",
}
"""What the prompt shows of each level; levels sharing a surface differ only in hidden difficulty."""


def make_problem(a: int, op: str, b: int, level: str) -> RawProblem:
    value = a + b if op == "+" else a * b
    return RawProblem(f"Calculate {a} {op} {b}.", str(value), level, {"a": a, "op": op, "b": b})


class ArithmeticTask(Task):
    """Integer sums and products in five levels; held-out prompts never appear in training, nor do
    their swapped twins (`b + a` for `a + b`): `overlap()` counts them as the same question."""

    name = "arithmetic"

    def equivalence_key(self, problem: Problem) -> Any:
        a, op, b = problem.data["a"], problem.data["op"], problem.data["b"]
        return (op, min(a, b), max(a, b))

    def _generate(self) -> tuple[list[RawProblem], list[RawProblem]]:
        levels = self.config.levels or list(LEVELS)
        for level in levels:
            if level not in LEVELS:
                raise unknown_name("arithmetic level", level, LEVELS, field="task.levels")
        rng = random.Random(self.config.seed)
        train_per_level = _spread(self.config.num_train, len(levels))
        test_per_level = _spread(self.config.num_test, len(levels))
        train_by_level, test_by_level = [], []
        for level, n_train, n_test in zip(levels, train_per_level, test_per_level, strict=True):
            # Test prompts are drawn first so a level with few distinct prompts keeps a full test split.
            # `a + b` and `b + a` are one question: training never holds a test question's swapped twin
            # (both orders of a training question may train).
            seen: set[tuple[int, str, int]] = set()
            held_out: set[tuple[str, int, int]] = set()
            drawn: list[RawProblem] = []
            attempts = 0
            while len(drawn) < n_train + n_test and attempts < 50 * (n_train + n_test):
                attempts += 1
                a, op, b = LEVELS[level](rng)
                twin = (op, min(a, b), max(a, b))
                if (a, op, b) in seen or twin in held_out:
                    continue
                seen.add((a, op, b))
                if len(drawn) < n_test:
                    held_out.add(twin)
                drawn.append(make_problem(a, op, b, level))
            test_by_level.append(drawn[:n_test])
            train_by_level.append(drawn[n_test:])
        return _interleave(train_by_level), _interleave(test_by_level)


def _spread(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _interleave(groups: list[list[RawProblem]]) -> list[RawProblem]:
    """Round-robin over levels, so any prefix of a split covers every level evenly."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out
