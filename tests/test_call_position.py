"""Where in its trace a device calls for help (agents.call_position): positions and what precedes a call
on hand-written completions of running_total problems, the histogram, the call-rate panels and the
report's sections (call positions, routers' right/wrong classification)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from agents.baselines.context import MethodResult
from agents.call_position import (
    CallPositions,
    call_positions,
    count_calls,
    has_worked_steps,
    steps_before_call,
    task_from_context,
    trace_call,
)
from agents.plots import help_option_runs, plot_call_positions, plot_call_rates
from agents.report import write_report
from collab_env.config import TaskConfig
from collab_env.tasks import HELP_MARKER, make_task
from collab_env.tasks.running_total import step_carries, totals

TASK = TaskConfig(name="running_total", num_train=20, num_test=12)


@pytest.fixture(scope="module")
def task():
    return make_task(TASK)


def true_carry(problem, k: int) -> bool:
    """Whether the k-th operation carries, from the problem's own numbers (not from its written steps)."""
    start, ops = problem.data["start"], problem.data["ops"]
    before = [start, *totals(start, ops)][k]
    return step_carries(before, *ops[k])


def wrong(step: str) -> str:
    """The step with its result off by one."""
    head, result = step.split("=")
    return f"{head}={int(result) + 1}"


def completions(task):
    """(problem, called_help, completion) of the four cases: a call after no step, a call right after a
    wrong step, a call after every step, and an answer without a call; plus a step cut by the marker."""
    p = task.problems("test")
    s = [task.worked_steps(q) for q in p[:5]]
    return [
        (p[0], True, f"<think> {HELP_MARKER}"),
        (p[1], True, f"<think>{s[1][0]} {wrong(s[1][1])} {HELP_MARKER}"),
        (p[2], True, f"<think>{' '.join(s[2])} {HELP_MARKER}"),
        (p[3], False, f"<think>{' '.join(s[3])}</think><answer>{p[3].answer}</answer>"),
        (p[4], True, f"<think>{s[4][0]} {s[4][1][:4]}{HELP_MARKER}"),
    ]


def info(problem, called: bool, completion: str) -> dict:
    right = not called
    return {
        "prompt_id": problem.id,
        "level": problem.level,
        "called_help": called,
        "called_cloud": called,
        "local_correct": right,
        "cloud_correct": True if called else None,
        "correct": True,
        "outcome": "cloud_correct" if called else "local_correct",
        "completion_tokens": len(completion) // 3,
        "completion": completion,
    }


def test_positions_and_what_precedes_each_call(task):
    cases = completions(task)
    placed = []
    for problem, called, text in cases:
        written = steps_before_call(text)
        assert (written is None) == (not called)
        if called:
            placed.append(trace_call(written, task.worked_steps(problem)))
    none, after_wrong, after_all, cut = placed
    p = [c[0] for c in cases]
    assert (none.position, none.precedes, none.all_right, none.last_wrong) == (0, "none", True, False)
    assert none.next_carries == true_carry(p[0], 0)
    assert (after_wrong.position, after_wrong.precedes) == (2, "wrong")
    assert not after_wrong.all_right and after_wrong.last_wrong
    assert after_wrong.next_carries == true_carry(p[1], 2)
    assert (after_all.position, after_all.precedes, after_all.all_right) == (3, "right", True)
    assert after_all.next_carries is None  # no step left
    assert (cut.position, cut.precedes, cut.all_right) == (1, "right", True)  # half a step is no step
    assert cut.next_carries == true_carry(p[4], 1)

    counts = count_calls([info(*c) for c in cases], task)
    assert (counts.completions, counts.calls) == (5, 4)
    assert {k: dict(v) for k, v in counts.by_position.items()} == {
        0: {"none": 1},
        1: {"right": 1},
        2: {"wrong": 1},
        3: {"right": 1},
    }
    assert (counts.all_right, counts.last_wrong, counts.next_known, counts.max_steps) == (3, 1, 3, 3)
    assert counts.next_carries == sum(true_carry(p[i], k) for i, k in ((0, 0), (1, 2), (4, 1)))
    every = [true_carry(q, k) for q in p for k in range(3)]
    assert (counts.true_steps, counts.carrying_steps) == (15, sum(every))


def test_steps_are_read_with_spaces_and_the_untagged_call():
    assert steps_before_call("<think>37 + 48 = 85 85-29=56 I need external assistance") == [
        "37+48=85",
        "85-29=56",
    ]
    assert steps_before_call("<think>37+48=85</think><answer>85</answer>") is None
    assert steps_before_call(f"{HELP_MARKER}") == []


def test_methods_without_text_or_without_worked_steps_are_skipped(task):
    cases = completions(task)
    with_text = [info(*c) for c in cases]
    router = [{k: v for k, v in i.items() if k != "completion"} for i in with_text]
    silent = [info(p, False, "<think></think><answer>1</answer>") for p, _, _ in cases]
    by_seed = {
        seed: [
            MethodResult("gapg", "GAPG", with_text),
            MethodResult("prompt_router", "router", router),
            MethodResult("collab_grpo", "no filter", silent),
        ]
        for seed in (0, 1)
    }
    found = call_positions(by_seed, task)
    assert list(found) == ["gapg"]  # the router has no text, the other policy never called
    assert (found["gapg"].calls, found["gapg"].completions) == (8, 10)  # summed over both seeds
    arithmetic = make_task({"name": "arithmetic", "num_train": 20, "num_test": 10})
    plain = [info(p, True, f"<think> {HELP_MARKER}") for p in arithmetic.problems("test")[:3]]
    assert count_calls(plain, arithmetic) is None  # no worked steps: nothing to place a call in
    assert has_worked_steps("running_total") and not has_worked_steps("arithmetic")
    assert task_from_context({"task": "arithmetic", "config": {"task": {"name": "arithmetic"}}}) is None
    assert task_from_context({}) is None


def test_the_plots_write_pngs(tmp_path, task):
    counts = count_calls([info(*c) for c in completions(task)], task)
    other = CallPositions()
    for written in ([], [], ["1+1=3"]):
        other.add(trace_call(written, ["1+1=2", "2+9=11", "11-5=6"]))
    other.max_steps = 3
    path = plot_call_positions(
        tmp_path / "positions.png", {"gapg": counts, "da_grpo": other}, {"gapg": "GAPG"}
    )
    assert path.stat().st_size > 10_000
    rows = [
        {"step": s, "env/help_rate": 0.1 * s, **({"eval/help_rate": 0.2} if s % 2 else {})} for s in range(5)
    ]
    path = plot_call_rates(tmp_path / "rates.png", [("GAPG", rows), ("DA-GRPO", rows), ("GRPO", rows)])
    assert path.stat().st_size > 10_000


def write_metrics(path, help_rate: float) -> None:
    path.parent.mkdir(parents=True)
    lines = ["step,env/reward,env/help_rate,eval/help_rate,eval/cloud_rate,eval/accuracy"]
    lines += [f"{s},0.5,{help_rate},{help_rate},{help_rate / 2},0.6" for s in range(1, 6)]
    path.write_text("\n".join(lines) + "\n")


def test_the_report_places_calls_and_shows_the_routers_classification(tmp_path, task):
    cases = completions(task)
    problems = [c[0] for c in cases]
    runs = tmp_path / "runs"
    for agent, rate in (("gapg-answer_tags", 0.3), ("da_grpo-answer_tags", 0.2), ("grpo-plain", 0.0)):
        write_metrics(runs / agent / "seed0" / "metrics.csv", rate)
    answered = [info(p, False, f"<answer>{p.answer}</answer>") for p in problems]
    results = [
        MethodResult("device_only", "Device only", answered),
        MethodResult("cloud_only", "Cloud only", [info(p, True, "") for p in problems]),
        MethodResult(
            "task_tuning", "Task-tuning", answered, training_metrics=runs / "grpo-plain/seed0/metrics.csv"
        ),
        MethodResult(
            "gapg",
            "GAPG (ours)",
            [info(*c) for c in cases],
            training_metrics=runs / "gapg-answer_tags/seed0/metrics.csv",
        ),
        MethodResult(
            "da_grpo",
            "Lagrangian GRPO",
            [info(*cases[0]), *answered[1:]],
            training_metrics=runs / "da_grpo-answer_tags/seed0/metrics.csv",
        ),
        MethodResult(
            "prompt_router",
            "Task-tuning + prompt router",
            [{k: v for k, v in i.items() if k != "completion"} for i in answered],
            extra={"router/test_accuracy": 0.6, "router/test_auc": 0.55, "router/train_accuracy": 0.7},
        ),
    ]
    context = {"name": "hidden", "task": "running_total", "config": {"task": dataclasses.asdict(TASK)}}
    report = write_report(tmp_path / "report", {0: results}, [True] * len(problems), context)
    text = report.read_text()
    assert "Where in its trace each policy calls" in text and "![call_positions](call_positions.png)" in text
    # GAPG: 4 calls, after 0, 2 (wrong), 3 and 1 steps: a quarter each, one in four after a wrong step
    assert "| GAPG (ours) | 4 | 25.0 | 25.0 | 25.0 | 25.0 | 25.0 |" in text
    assert "| Lagrangian GRPO | 1 | 100.0 | 0.0 | 0.0 | 0.0 | 0.0 |" in text
    assert "Routers' right/wrong classification" in text
    assert "| Task-tuning + prompt router | 60.0 | 0.550 | 100.0 | 70.0 |" in text
    for png in ("call_positions.png", "call_rates.png", "curves.png"):
        assert (tmp_path / "report" / png).stat().st_size > 10_000
    assert "![call_rates](call_rates.png)" in text
    assert [label for label, _ in help_option_runs(results)] == ["GAPG (ours)", "Lagrangian GRPO"]
    saved = json.loads((tmp_path / "report" / "results.json").read_text())["call_positions"]
    assert set(saved) == {"gapg", "da_grpo"} and saved["gapg"]["calls"] == 4

    # A task without worked steps and routers without the numbers: neither section
    plain = {"name": "plain", "task": "arithmetic", "config": {"task": {"name": "arithmetic"}}}
    bare = [dataclasses.replace(r, extra={}) for r in results]
    text = write_report(tmp_path / "plain", {0: bare}, [True] * len(problems), plain).read_text()
    assert "Where in its trace" not in text and "Routers' right/wrong" not in text
    assert not (tmp_path / "plain" / "call_positions.png").exists()
