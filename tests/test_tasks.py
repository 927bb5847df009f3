"""Tasks: verifiers on right and wrong answers, splits, JSONL errors, safe expression parsing."""

from __future__ import annotations

import json
import random
import time

import pytest

from collab_env import ConfigError, DatasetError
from collab_env.tasks import LEVELS, SURFACE, make_task
from collab_env.tasks.expressions import UnsafeExpression, check_countdown, evaluate, solve_countdown


def test_arithmetic_levels_splits_and_answers():
    task = make_task({"name": "arithmetic", "num_train": 500, "num_test": 250, "seed": 1})
    train, test = task.problems("train"), task.problems("test")
    assert len(train) == 500 and len(test) == 250
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


@pytest.mark.parametrize("name", ["chain_sum", "basic_arithmetic", "gsm_symbolic"])
def test_reasoning_gym_tasks_verify_their_own_answers(name):
    task = make_task({"name": name, "num_train": 20, "num_test": 10})
    rng = random.Random(0)
    for p in task.problems("test"):
        assert task.verify(p, p.answer)
        assert not task.verify(p, task.wrong_answer(p, rng))


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
    assert solve_countdown(numbers, target) is None or check_countdown(
        solve_countdown(numbers, target), numbers, target
    )


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
    assert len(task.problems("test")) == 3 and len(task.problems("train")) == 7
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
    for p in task.problems("train") + task.problems("test"):
        assert task.verify(p, p.answer)  # answers found by the exhaustive solver


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
