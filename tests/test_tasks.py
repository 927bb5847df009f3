"""Tasks: verifiers on right and wrong answers, splits, JSONL errors, safe expression parsing."""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
import time
import warnings
from fractions import Fraction

import pytest

from collab_env import ConfigError, DatasetError
from collab_env.errors import DatasetWarning
from collab_env.tasks import LEVELS, SURFACE, make_task
from collab_env.tasks.expressions import UnsafeExpression, check_countdown, evaluate, solve_countdown


def test_arithmetic_levels_splits_and_answers():
    task = make_task({"name": "arithmetic", "num_train": 500, "num_test": 250, "seed": 1})
    train, test = task.problems("train"), task.problems("test")
    validation = task.problems("validation")
    # 4% of the 500 training problems are held out for validation, with their swapped twins
    assert len(validation) == 20 and 480 - 20 <= len(train) <= 480 and len(test) == 250
    assert {p.question for p in train}.isdisjoint(p.question for p in test)
    assert task.levels == list(LEVELS)
    assert [p.level for p in test[:5]] == list(LEVELS)  # interleaved: every prefix is balanced
    for p in test:
        a, op, b = p.data["a"], p.data["op"], p.data["b"]
        assert int(p.answer) == (a + b if op == "+" else a * b)
    carry = [p for p in test if p.level == "add2_carry"]
    assert all(
        (p.data["a"] % 10 + p.data["b"] % 10 >= 10) or (p.data["a"] // 10 + p.data["b"] // 10 >= 10)
        for p in carry
    )
    assert SURFACE["add2"] == SURFACE["add2_carry"]  # same surface, hidden difficulty
    again = make_task({"name": "arithmetic", "num_train": 500, "num_test": 250, "seed": 1})
    assert [p.question for p in again.problems("test")] == [p.question for p in test]
    other = make_task({"name": "arithmetic", "num_train": 500, "num_test": 250, "seed": 2})
    assert [p.question for p in other.problems("test")] != [p.question for p in test]


def test_numeric_verifier():
    task = make_task({"name": "arithmetic", "num_train": 10, "num_test": 10})
    p = task.problems("test")[0]
    assert task.verify(p, p.answer) and task.verify(p, f" {p.answer}. ") and task.verify(p, f"{p.answer}.0")
    assert not task.verify(p, str(int(p.answer) + 1))
    assert not task.verify(p, None) and not task.verify(p, "") and not task.verify(p, f"{p.answer} apples")
    assert task.extract_answer(f"<think>x</think><answer> {p.answer} </answer>") == p.answer
    assert task.extract_answer("no tags") is None


def exact_value(text: str) -> tuple[Fraction, list[int]]:
    """The test's own evaluator (recursive descent over exact fractions, nothing of the project's): the
    value of an arithmetic expression of integers, + - * /, unary minus and parentheses, and its literals."""
    tokens = re.findall(r"\d+|[-+*/()]", text)
    assert "".join(tokens) == re.sub(r"\s", "", text), f"unexpected characters in {text!r}"
    position, literals = 0, []

    def take() -> str:
        nonlocal position
        position += 1
        return tokens[position - 1]

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def atom() -> Fraction:
        token = take()
        if token == "-":
            return -atom()
        if token == "(":
            value = total()
            assert take() == ")"
            return value
        literals.append(int(token))
        return Fraction(int(token))

    def product() -> Fraction:
        value = atom()
        while peek() in ("*", "/"):
            value = value * atom() if take() == "*" else value / atom()
        return value

    def total() -> Fraction:
        value = product()
        while peek() in ("+", "-"):
            value = value + product() if take() == "+" else value - product()
        return value

    value = total()
    assert position == len(tokens), f"trailing tokens in {text!r}"
    return value, literals


def test_the_independent_evaluator_itself():
    assert exact_value("-( -55 - 810 * 622 ) * 904") == (455503000, [55, 810, 622, 904])
    assert exact_value("12 / (2 * 3)")[0] == 2 and exact_value("12 / 2 * 3")[0] == 18
    assert exact_value("7 - 2 - 1")[0] == 4 and exact_value("1 - -2")[0] == 3


# Worked by hand from the question text (reasoning-gym 0.1.25, test split of seed 0).
GSM_BY_HAND = {
    "I have 14 liters of lemon drink that are 0.8 water": 20,  # (14 - 4) * 0.8 + 20 * 0.6
    "James collects garbage from 4 different apartment complexes": 1260,  # (750 + 1.4 * 750) * 2 * 0.35
    "On Thursday, Michael wants to exercise for 4 the amount of time": 300,  # 4 * (48 + 27)
}


def independent_truth(name: str, question: str, data: dict) -> Fraction | None:
    """The right answer worked out without the generator's answer or the task's verifier."""
    if name == "chain_sum":
        return exact_value(question.split(":", 1)[1].rstrip("= "))[0]
    if name == "basic_arithmetic":
        return exact_value(question.removeprefix("Calculate ").rstrip("."))[0]
    if name == "arithmetic":
        return Fraction(data["a"] + data["b"] if data["op"] == "+" else data["a"] * data["b"])
    return next((Fraction(v) for k, v in GSM_BY_HAND.items() if question.startswith(k)), None)


@pytest.mark.parametrize("name", ["arithmetic", "chain_sum", "basic_arithmetic", "gsm_symbolic", "countdown"])
def test_generated_ground_truth_is_right_and_nothing_is_dropped(name):
    """`Task._checked` drops problems whose ground truth fails the task's own verifier, so verifying
    the kept ones against themselves proves nothing: each ground truth is checked here against an
    independent computation, and a generator must not have lost a single problem to the check."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)  # a dropped problem warns: here that fails
        task = make_task({"name": name, "num_train": 20, "num_test": 10})
    assert task.skipped == {}
    assert len(task) == 30 and len(task.problems("test")) == 10  # every split, by the public ids
    rng = random.Random(0)
    by_hand = 0
    for p in map(task.problem, range(len(task))):
        if name == "countdown":  # the ground truth is an expression: its value and its numbers
            value, used = exact_value(p.answer)
            assert value == p.data["target"] and sorted(used) == sorted(p.data["numbers"]), p
        else:
            truth = independent_truth(name, p.question, p.data)
            if truth is None:
                continue
            by_hand += 1
            assert Fraction(p.answer) == truth, (p.question, p.answer, truth)
        assert task.verify(p, p.answer)
        assert not task.verify(p, task.wrong_answer(p, rng))
    if name == "gsm_symbolic":
        assert by_hand == len(GSM_BY_HAND)  # every hand-worked problem was generated and checked


def test_countdown_task_and_safe_parser():
    task = make_task({"name": "countdown", "num_train": 20, "num_test": 10})
    p = task.problems("test")[0]
    assert "create an equation that equals" in p.question
    assert task.verify(p, p.answer)
    assert not task.verify(p, task.wrong_answer(p, random.Random(0)))
    numbers, target = list(p.data["numbers"]), p.data["target"]
    assert not task.verify(p, f"{target}")  # the target alone does not use the numbers
    assert check_countdown("(6 - 2) * 3 + 1", [1, 2, 3, 6], 13)
    assert not check_countdown("(6 - 2) * 3", [1, 2, 3, 6], 12)  # 1 unused
    assert check_countdown("(6 - 2) * 3", [1, 2, 3, 6], 12, use_all=False)
    assert not check_countdown("6 * 6", [1, 2, 3, 6], 36, use_all=False)  # 6 used twice
    value, used = exact_value(p.answer)
    assert value == target and sorted(used) == sorted(numbers)


@pytest.mark.parametrize(
    "attack",
    [
        "__import__('os').system('echo pwned')",
        "().__class__.__bases__[0].__subclasses__()",
        "9**9**9",
        "9 ** 9 ** 9",
        "exec('1')",
        "1" * 500,
        "(" * 300 + "1" + ")" * 300,
        "lambda: 1",
    ],
)
def test_code_injection_and_huge_powers_are_rejected_fast(attack):
    start = time.perf_counter()
    with pytest.raises(UnsafeExpression):
        evaluate(attack)
    assert not check_countdown(attack, [9, 9, 9], 0)
    assert time.perf_counter() - start < 1.0


def test_evaluate_is_exact():
    value, numbers = evaluate("(7 - 1) / 4 * 2")
    assert value == 3 and numbers == [7, 1, 4, 2]
    with pytest.raises(ZeroDivisionError):
        evaluate("1 / (2 - 2)")


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_jsonl_math_task(tmp_path):
    rows = [
        {"problem": f"What is {i}/2?", "solution": f"So it is $\\boxed{{\\frac{{{i}}}{{2}}}}$."}
        for i in range(1, 11)
    ]
    task = make_task({"name": "jsonl_math", "path": _write(tmp_path / "m.jsonl", rows), "test_fraction": 0.3})
    # 7 training rows: one is held out for validation (at least one, 4% rounded)
    assert len(task.problems("test")) == 3 and len(task.problems("train")) == 6
    assert len(task.problems("validation")) == 1
    p = task.problems("test")[0]
    i = int(p.question.split()[2].split("/")[0])
    assert p.answer == f"\\frac{{{i}}}{{2}}"
    assert task.verify(p, str(i / 2)) and task.verify(p, p.answer) and not task.verify(p, str(i / 2 + 1))
    assert task.extract_answer("Step 1: so \\boxed{\\frac{3}{2}}") is None  # answer_tags template
    steps = make_task({"name": "jsonl_math", "path": str(tmp_path / "m.jsonl"), "template": "numbered_steps"})
    assert steps.extract_answer("Step 1: so \\boxed{\\frac{3}{2}}") == "\\frac{3}{2}"


def test_jsonl_countdown_task(tmp_path):
    rows = [
        {"nums": [1, 2, 3, 6], "target": 13},
        {"nums": [2, 5], "target": 10},
        {"nums": [4, 4], "target": 16},
    ]
    task = make_task(
        {"name": "jsonl_countdown", "path": _write(tmp_path / "c.jsonl", rows), "test_fraction": 0.34}
    )
    assert task.skipped == {} and len(task) == 3
    for p in map(task.problem, range(len(task))):
        value, used = exact_value(p.answer)  # answers found by the exhaustive solver, checked here
        assert value == p.data["target"] and sorted(used) == sorted(p.data["numbers"])


def test_dropped_rows_of_a_jsonl_file_are_counted_and_reported(tmp_path):
    """What a data file loses to the ground-truth check is counted per split and named in a warning."""
    rows = [
        {"nums": [1, 2, 3, 6], "target": 13},
        {"nums": [1, 1], "target": 100},  # no expression reaches 100: no ground truth
        {"nums": [2, 5], "target": 10},
        {"nums": [3, 3], "target": 1, "solution": "3 - 3"},  # a given solution that is wrong
    ]
    path = _write(tmp_path / "c.jsonl", rows)
    test_path = _write(tmp_path / "t.jsonl", [{"nums": [4, 4], "target": 16}])
    with pytest.warns(DatasetWarning, match="skipped 2 of 4 train problems .* with answer ''"):
        task = make_task({"name": "jsonl_countdown", "path": path, "test_path": test_path})
    assert task.skipped == {"train": 2} and len(task) == 3 and len(task.problems("test")) == 1
    good = {"problem": "ok", "solution": "\\boxed{2}"}
    tower = {"problem": "tower", "solution": "\\boxed{9^{9^{9}}}"}  # refused before math-verify sees it
    with pytest.warns(DatasetWarning, match="skipped 1 of 2 test problems"):
        task = make_task(
            {
                "name": "jsonl_math",
                "path": _write(tmp_path / "m.jsonl", [good]),
                "test_path": _write(tmp_path / "mt.jsonl", [{**good, "problem": "ok too"}, tower]),
            }
        )
    assert task.skipped == {"test": 1}


@functools.cache
def countdown_values(numbers: tuple[int, ...]) -> frozenset[Fraction]:
    """Every value an expression using each number exactly once can take (brute force over splits)."""
    if len(numbers) == 1:
        return frozenset({Fraction(numbers[0])})
    values: set[Fraction] = set()
    for size in range(1, len(numbers)):
        for left in itertools.combinations(range(len(numbers)), size):
            a = tuple(sorted(numbers[i] for i in left))
            b = tuple(sorted(n for i, n in enumerate(numbers) if i not in left))
            for x in countdown_values(a):
                for y in countdown_values(b):
                    values |= {x + y, x - y, x * y} | ({x / y} if y else set())
    return frozenset(values)


SOLVABLE = [
    ([1, 2, 3, 6], 13),
    ([2, 5], 10),
    ([4, 4], 16),
    ([3, 8, 3], 1),
    ([6, 4, 3], 8),
    ([1, 5, 5, 5], 24),
]
UNSOLVABLE = [([1, 1], 100), ([2, 3], 7), ([1, 1, 1], 5), ([7], 8), ([1, 1, 1, 1], 5)]  # by hand


def test_solve_countdown_on_known_solvable_and_unsolvable_instances():
    for numbers, target in SOLVABLE:
        solution = solve_countdown(numbers, target)
        assert solution is not None, (numbers, target)
        value, used = exact_value(solution)
        assert value == target and sorted(used) == sorted(numbers), solution
        assert check_countdown(solution, numbers, target)
    for numbers, target in UNSOLVABLE:
        assert Fraction(target) not in countdown_values(tuple(sorted(numbers)))  # the table is right
        assert solve_countdown(numbers, target) is None, (numbers, target)
    assert solve_countdown([], 3) is None and solve_countdown([1] * 7, 7) is None  # out of its range


def random_instances(count: int) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    return [
        ([rng.randint(1, 12) for _ in range(rng.choice([2, 3, 4]))], rng.randint(1, 40)) for _ in range(count)
    ]


def test_solve_countdown_finds_a_solution_exactly_when_one_exists():
    solvable = 0
    for numbers, target in random_instances(200):
        exists = Fraction(target) in countdown_values(tuple(sorted(numbers)))
        assert (solve_countdown(numbers, target) is not None) == exists, (numbers, target)
        solvable += exists
    assert 40 < solvable < 160  # both kinds are well represented


def test_every_countdown_solution_reaches_its_target():
    """It found a bug: the solver wrote a / (b * c) as 'a / b * c' ([1, 2, 12, 7] -> 1 gave
    '(7 - 12 / 1 * 2)' = -17); products and quotients are now bracketed like sums."""
    for numbers, target in random_instances(300):
        solution = solve_countdown(numbers, target)
        if solution is not None:
            value, used = exact_value(solution)
            assert value == target and sorted(used) == sorted(numbers), (numbers, target, solution)


@pytest.mark.parametrize(
    ("name", "row", "message"),
    [
        ("jsonl_math", '{"problem": "x"}', "key 'solution' is missing"),
        ("jsonl_math", '{"problem": "x", "solution": "no box"}', "no \\\\boxed"),
        ("jsonl_math", "not json", "not valid JSON"),
        ("jsonl_math", "[1, 2]", "expected a JSON object"),
        ("jsonl_countdown", '{"nums": [1, "a"], "target": 3}', "list of integers"),
        ("jsonl_countdown", '{"nums": [1, 2], "target": "3"}', "key 'target' is a str"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, name, row, message):
    good = (
        '{"problem": "1+1", "solution": "\\\\boxed{2}"}'
        if name == "jsonl_math"
        else '{"nums": [1, 2], "target": 3}'
    )
    path = _write(tmp_path / "bad.jsonl", [good, "", row])
    with pytest.raises(DatasetError, match=message) as err:
        make_task({"name": name, "path": path})
    assert f"{path}:3:" in str(err.value)


def test_unknown_task_and_level_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'countdown'"):
        make_task({"name": "countdwn"})
    with pytest.raises(ConfigError, match="unknown arithmetic level 'add4'"):
        make_task({"name": "arithmetic", "levels": ["add4"]})
    with pytest.raises(DatasetError, match="does not exist"):
        make_task({"name": "jsonl_math", "path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(DatasetError, match="need at least one"):
        make_task(
            {
                "name": "jsonl_math",
                "path": _write(tmp_path / "one.jsonl", ['{"problem": "a", "solution": "\\\\boxed{1}"}']),
            }
        )
