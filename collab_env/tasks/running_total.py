"""`running_total`: a running total over a few additions and subtractions, one surface form for all.

"Start with 37, add 48, subtract 29, then add 56." Every question has the same shape: a two-digit
start and `steps` operations, each adding or subtracting a two-digit number, with the running total
kept between 0 and `max_total`. What makes one question harder than another for a small device is
what happens *inside* the computation: how many of its steps carry or borrow (37 + 48 carries in the
units column; 85 - 29 borrows), and whether the total crosses a hundred. Those are properties of the
intermediate totals, which a reader of the question only learns by computing them.

Why a prompt-only router cannot see the difficulty: the first step's carry is visible in the digits
of the first two numbers, but every later step's depends on a running total the question never
states. A router on sentence embeddings (or on a device's hidden state before it writes anything)
would have to carry out the chain to know it; the device finds out while writing its steps.
`docs/hidden_difficulty.md` measures this: the prompt router's right/wrong accuracy, a hand-made
feature router (gradient boosting on the numbers themselves, task knowledge a general router does
not have) and the device's own confidence.

The level is the number of steps that carry or borrow ("0 carries" ... "3 carries"), hidden from the
surface; `worked_steps` writes the computation one step at a time ("37+48=85"), what a device with a
trace (`device=tiny-reason`) learns to write before it answers or calls for help.
"""

from __future__ import annotations

import random
from typing import Any

from collab_env.errors import ConfigError
from collab_env.tasks.base import Problem, RawProblem, Task

DEFAULTS: dict[str, int] = {"steps": 3, "low": 10, "high": 99, "max_total": 199}
"""Generator settings (`task.generator` overrides them): operations per question, the range of the
start and of every operand, and the largest running total allowed."""

_WORDS = {"+": "add", "-": "subtract"}


def step_carries(total: int, op: str, operand: int) -> bool:
    """Whether `total op operand` carries (+) or borrows (-) in the units column."""
    if op == "+":
        return total % 10 + operand % 10 >= 10
    return total % 10 < operand % 10


def totals(start: int, ops: list[tuple[str, int]]) -> list[int]:
    """The running total after each operation."""
    out, total = [], start
    for op, operand in ops:
        total = total + operand if op == "+" else total - operand
        out.append(total)
    return out


def question(start: int, ops: list[tuple[str, int]]) -> str:
    said = [f"{_WORDS[op]} {operand}" for op, operand in ops]
    listed = ", ".join(said[:-1]) + (", then " if len(said) > 1 else "") + said[-1]
    return f"Start with {start}, {listed}."


class RunningTotalTask(Task):
    """A running total over `generator.steps` two-digit additions and subtractions; the level (number of
    carrying or borrowing steps) does not show on the question."""

    name = "running_total"

    def __init__(self, config: Any) -> None:
        unknown = sorted(set(config.generator) - set(DEFAULTS))
        if unknown:
            raise ConfigError(
                f"task.generator has unknown setting(s) {unknown} for running_total; its settings are "
                f"{sorted(DEFAULTS)}."
            )
        self.settings = {**DEFAULTS, **config.generator}
        s = self.settings
        if s["steps"] < 1 or not 0 <= s["low"] <= s["high"] <= s["max_total"]:
            raise ConfigError(f"task.generator={s}: need steps >= 1 and 0 <= low <= high <= max_total.")
        super().__init__(config)

    def _draw(self, rng: random.Random) -> RawProblem:
        s = self.settings
        start = rng.randint(s["low"], s["high"])
        ops: list[tuple[str, int]] = []
        total = start
        while len(ops) < s["steps"]:
            op, operand = rng.choice("+-"), rng.randint(s["low"], s["high"])
            after = total + operand if op == "+" else total - operand
            if 0 <= after <= s["max_total"]:
                ops.append((op, operand))
                total = after
        carries, running = 0, start
        for (op, operand), after in zip(ops, totals(start, ops), strict=True):
            carries += step_carries(running, op, operand)
            running = after
        level = f"{carries} carr{'y' if carries == 1 else 'ies'}"
        return RawProblem(question(start, ops), str(total), level, {"start": start, "ops": ops})

    def _generate(self) -> tuple[list[RawProblem], list[RawProblem]]:
        if self.config.levels:
            raise ConfigError(
                "task.levels does not apply to running_total: its levels are hidden properties of the "
                "computation, not something to choose. Leave task.levels=null."
            )
        rng = random.Random(self.config.seed)
        drawn: list[RawProblem] = []
        seen: set[str] = set()
        wanted = self.config.num_train + self.config.num_test
        attempts = 0
        while len(drawn) < wanted and attempts < 50 * wanted:
            attempts += 1
            row = self._draw(rng)
            if row.question not in seen:
                seen.add(row.question)
                drawn.append(row)
        # Test prompts first, as arithmetic does: a larger num_train never changes the test split.
        test, train = drawn[: self.config.num_test], drawn[self.config.num_test :]
        return train, test

    @property
    def levels(self) -> list[str]:
        """The levels present, fewest carries first."""
        return sorted(super().levels, key=lambda level: int(level.split()[0]))

    def worked_steps(self, problem: Problem) -> list[str]:
        """The computation written one operation at a time: ["37+48=85", "85-29=56", "56+56=112"]."""
        ops = [(op, int(operand)) for op, operand in problem.data["ops"]]
        running = [int(problem.data["start"]), *totals(int(problem.data["start"]), ops)]
        return [
            f"{before}{op}{operand}={after}"
            for before, (op, operand), after in zip(running, ops, running[1:], strict=False)
        ]
