"""running_total, the hidden-difficulty task, and the trace recipe that teaches a device to write its steps."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import agents.supervised as supervised
import agents.tiny_arith as tiny_arith
from collab_env import ConfigError, DeviceConfig, TaskConfig
from collab_env.tasks import HELP_MARKER, make_task
from collab_env.tasks.running_total import step_carries, totals

TASK = TaskConfig(name="running_total", num_train=300, num_test=100)
SURFACE = re.compile(
    r"^Start with \d\d, (add|subtract) \d\d, (add|subtract) \d\d, then (add|subtract) \d\d\.$"
)


def test_one_surface_form_and_the_answer_is_the_running_total():
    task = make_task(TASK)
    problems = task.problems("train") + task.problems("test") + task.problems("validation")
    assert len({p.question for p in problems}) == len(problems)
    for p in problems:
        assert SURFACE.match(p.question), p.question
        ops = [(op, int(n)) for op, n in p.data["ops"]]
        running = totals(p.data["start"], ops)
        assert all(0 <= t <= 199 for t in running)
        assert p.answer == str(running[-1])
        assert task.verify(p, p.answer) and not task.verify(p, str(running[-1] + 1))
    assert task.overlap() == {"train_validation": 0, "train_test": 0, "validation_test": 0}


def test_level_counts_carrying_steps_and_worked_steps_show_them():
    task = make_task(TASK)
    assert task.levels == ["0 carries", "1 carry", "2 carries", "3 carries"]
    for p in task.problems("test"):
        steps = task.worked_steps(p)
        assert len(steps) == 3
        carries = 0
        for step in steps:
            before, op, operand, after = re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)", step).groups()
            assert int(after) == (int(before) + int(operand) if op == "+" else int(before) - int(operand))
            carries += step_carries(int(before), op, int(operand))
        assert steps[-1].endswith(f"={p.answer}")
        assert p.level.startswith(f"{carries} ")
    assert step_carries(37, "+", 48) and not step_carries(31, "+", 48)
    assert step_carries(85, "-", 29) and not step_carries(89, "-", 25)


def test_generation_is_deterministic_and_test_prompts_do_not_move_with_num_train():
    a, b = make_task(TASK), make_task(TASK)
    assert [p.question for p in a.problems("test")] == [p.question for p in b.problems("test")]
    bigger = make_task(TaskConfig(name="running_total", num_train=600, num_test=100))
    assert [p.question for p in bigger.problems("test")] == [p.question for p in a.problems("test")]
    other = make_task(TaskConfig(name="running_total", num_train=300, num_test=100, seed=1))
    assert [p.question for p in other.problems("test")] != [p.question for p in a.problems("test")]


def test_bad_generator_settings_name_the_problem():
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['stepz'\].*steps"):
        make_task(TaskConfig(name="running_total", generator={"stepz": 3}))
    with pytest.raises(ConfigError, match="low <= high <= max_total"):
        make_task(TaskConfig(name="running_total", generator={"high": 300}))
    with pytest.raises(ConfigError, match="task.levels does not apply"):
        make_task(TaskConfig(name="running_total", levels=["1 carry"]))


def test_longer_chains_follow_the_setting():
    task = make_task(TaskConfig(name="running_total", num_train=50, num_test=20, generator={"steps": 5}))
    p = task.problems("test")[0]
    assert p.question.count(",") == 5 and len(task.worked_steps(p)) == 5


def test_trace_examples_write_the_steps_then_answer_or_call_after_any_number_of_steps():
    env = supervised.prompt_env(TaskConfig(name="running_total", num_train=60, num_test=10), DeviceConfig())
    task, tokenizer = env.unwrapped.task, env.unwrapped.tokenizer
    problems = supervised.training_problems(task, None, "device.recipe.levels")
    data = supervised.SupervisedData(env, problems, marker_fraction=0.5, trace=True)
    texts = {i: tokenizer.decode(row[:-1]) for i, row in enumerate(data.answers)}
    for i, p in enumerate(problems):
        assert texts[i] == f"<think>{' '.join(task.worked_steps(p))}</think><answer>{p.answer}</answer>"
        calls = [tokenizer.decode(row[:-1]) for row in data.markers[i]]
        steps = task.worked_steps(p)
        assert calls == [f"<think>{' '.join(steps[:k])} {HELP_MARKER}" for k in range(len(steps) + 1)]
    batch = data.draw(400, np.random.default_rng(0))
    called = [
        tokenizer.decode([int(t) for t in labels if t >= 0])
        for labels, marker in zip(batch.labels, batch.markers, strict=True)
        if marker
    ]
    positions = {text.count("=") for text in called}
    assert positions == {0, 1, 2, 3}  # the marker is explored after every number of steps
    assert all(HELP_MARKER in text for text in called)
    env.close()


def test_trace_needs_a_task_with_worked_steps():
    env = supervised.prompt_env(TaskConfig(num_train=40, num_test=10), DeviceConfig())
    problems = supervised.training_problems(env.unwrapped.task, None, "device.recipe.levels")
    with pytest.raises(ConfigError, match=r"device.recipe.trace=true needs worked solutions.*running_total"):
        supervised.SupervisedData(env, problems, marker_fraction=0.1, trace=True)
    env.close()


def test_trace_is_part_of_the_cache_key_only_when_on():
    base = DeviceConfig(name="tiny-arith", recipe={"levels": None})
    traced = DeviceConfig(name="tiny-arith", recipe={"levels": None, "trace": True})
    assert "trace" not in tiny_arith.tiny_arith_spec(base, TASK)["recipe"]
    assert tiny_arith.tiny_arith_spec(traced, TASK)["recipe"]["trace"] is True
    assert tiny_arith.tiny_arith_dir(base, TASK) != tiny_arith.tiny_arith_dir(traced, TASK)


def test_hidden_cpu_preset_composes_for_any_seeds_and_leaves_room_for_trace_and_marker():
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from agents.baselines import METHODS
    from agents.registry import register_configs, to_objects
    from collab_env.models import load_tokenizer

    register_configs()
    configs = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=configs, version_base=None):
        cfg = compose(config_name="evaluate", overrides=["experiment=hidden_cpu", "seed=7", "task.seed=11"])
    run = to_objects(cfg)
    assert (run.seed, run.task.seed, run.task.name) == (7, 11, "running_total")
    assert run.device.recipe["trace"] is True and run.device.recipe["levels"] is None
    assert set(run.evaluate.methods) <= set(METHODS)
    assert {"gapg", "probe_router", "confidence_router", "oracle_router", "da_grpo"} <= set(
        run.evaluate.methods
    )
    task = make_task(dataclasses.replace(run.task, num_train=200, num_test=200))
    tokenizer = load_tokenizer(run.device)
    longest = max(
        len(
            tokenizer.encode(
                f"<think>{' '.join(task.worked_steps(p))} {HELP_MARKER}", add_special_tokens=False
            )
        )
        for p in task.problems("test")
    )
    assert longest < run.env.max_new_tokens


def test_a_larger_training_pool_keeps_the_held_out_questions_out():
    task = make_task(TASK)
    pool = make_task(dataclasses.replace(TASK, num_train=900))
    kept = tiny_arith._without_held_out(pool.problems("train") + pool.problems("validation"), task)
    held_out = {p.question for split in ("test", "validation") for p in task.problems(split)}
    assert kept and not {p.question for p in kept} & held_out
    assert len(kept) >= len(pool.problems("train")) - len(task.problems("validation"))
    with pytest.raises(ConfigError, match="device.recipe.train_prompts=0"):
        tiny_arith.tiny_arith_spec(DeviceConfig(name="tiny-arith", recipe={"train_prompts": 0}), TASK)
    pooled = DeviceConfig(name="tiny-arith", recipe={"levels": None, "train_prompts": 900})
    assert tiny_arith.tiny_arith_spec(pooled, TASK)["recipe"]["train_prompts"] == 900
