"""The report is produced end to end from a smoke run: trained runs, baselines, table, JSON, plots."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from test_train_smoke import CONFIGS, compose_experiment

from agents.checkpoint import CheckpointError
from agents.evaluate import evaluate
from agents.registry import register_configs, to_objects
from agents.report import main
from collab_env.tasks import make_task


def simulated_cloud_accuracy(run, num_prompts: int) -> float:
    """What the settings imply for cloud-only accuracy: the simulated cloud is right on a question when
    a uniform draw seeded by sha256(seed, question) falls below `accuracy` (its documented rule)."""
    problems = make_task(run.task).problems(run.evaluate.split)[:num_prompts]
    right = 0
    for problem in problems:
        digest = hashlib.sha256(f"{run.cloud.seed}\x00{problem.question}".encode()).digest()
        right += random.Random(int.from_bytes(digest[:8], "big")).random() < run.cloud.accuracy
    return right / len(problems)


def test_report_from_a_smoke_run(tmp_path):
    methods = (
        "[device_only,cloud_only,task_tuning,random_offload,oracle_router,sb3_router,tianshou_router,gapg]"
    )
    # A 90%-accurate cloud: it gets one of the 16 held-out prompts wrong, so cloud-only accuracy
    # is what the settings imply, not 1.0 by luck (the default 98% cloud answers all 16 right).
    run = compose_experiment(
        "smoke", [f"evaluate.methods={methods}", "train.steps=2", "cloud.accuracy=0.9"], entry="evaluate"
    )
    report = evaluate(run, tmp_path)
    text = report.read_text()
    labels = (
        "Device only",
        "Cloud only",
        "Task-tuning only",
        "random offload",
        "oracle router",
        "SB3",
        "Tianshou",
        "GAPG",
    )
    for label in labels:
        assert label in text
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    methods = results["methods"]
    context = results["context"]
    assert context["config"]["cloud"]["accuracy"] == 0.9 and context["num_prompts"] == 16
    seconds = context["method_seconds"]["0"]
    assert list(seconds) == list(methods) and all(value >= 0 for value in seconds.values())
    assert sum(seconds.values()) <= context["wall_time_s"] + 0.1 * len(seconds)  # each rounded to 0.1 s
    assert "Wall time" in text and f"| {methods['gapg']['label']} | " in text.split("Wall time")[1]
    implied = simulated_cloud_accuracy(run, context["num_prompts"])
    assert implied == 15 / 16
    cloud_only = methods["cloud_only"]["metrics"]
    assert cloud_only["accuracy"] == implied and cloud_only["cloud_rate"] == 1.0 == cloud_only["help_rate"]
    assert cloud_only["pgr"] == 1.0 and methods["device_only"]["metrics"]["pgr"] == 0.0
    cap = int(0.3 * results["context"]["num_prompts"])
    for name in ("random_offload", "oracle_router", "sb3_router", "tianshou_router", "gapg"):
        assert methods[name]["metrics"]["cloud_rate"] * results["context"]["num_prompts"] <= cap
    assert len(methods["random_offload"]["curve"]) == 19 and "apgr" in methods["random_offload"]["metrics"]
    assert (tmp_path / "report" / "pareto.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "runs" / "gapg-answer_tags" / "seed0" / "metrics.csv").exists()
    assert (tmp_path / "runs" / "grpo-plain" / "seed0" / "metrics.csv").exists()
    assert (tmp_path / "runs" / "sb3_ppo-routing" / "seed0" / "sb3_policy.safetensors").exists()
    # the learned routers route the task-tuned device's own answers: under the same cap none can
    # beat the oracle router, which sends exactly the prompts that device gets wrong
    for name in ("sb3_router", "tianshou_router"):
        assert methods[name]["metrics"]["accuracy"] <= methods["oracle_router"]["metrics"]["accuracy"]


def test_training_curves_of_several_runs_from_the_command_line(tmp_path, monkeypatch, capsys):
    for name, help_rate in (("a", 0.1), ("b", 0.5)):
        (tmp_path / name).mkdir()
        lines = ["step,env/reward,env/help_rate,env/help_rate/add2,env/help_rate/mul22,eval/accuracy"]
        lines += [
            f"{s},{0.3 + s / 100},{help_rate},{help_rate / 2},{help_rate * 2},{'0.4' if s % 5 == 0 else ''}"
            for s in range(1, 21)
        ]
        (tmp_path / name / "metrics.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "curves.png"
    argv = ["report", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "A", "B", "--out", str(out)]
    levels = tmp_path / "levels.png"
    monkeypatch.setattr(sys, "argv", [*argv, "--smooth", "5", "--levels-out", str(levels)])
    main()
    assert out.stat().st_size > 10_000 and levels.stat().st_size > 10_000
    monkeypatch.setattr(sys, "argv", ["report", str(tmp_path), "--out", str(out)])
    with pytest.raises(SystemExit):
        main()
    assert "no metrics.csv in" in capsys.readouterr().err


def smoke_gapg_runs(*changes: str) -> list[Any]:
    """The smoke experiment's 2-step GAPG evaluation settings, as they are and with each of `changes`."""
    register_configs()
    overrides = ["experiment=smoke", "evaluate.methods=[gapg]", "train.steps=2"]
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return [
            to_objects(compose(config_name="evaluate", overrides=[*overrides, *extra]))
            for extra in ([], *([change] for change in changes))
        ]


def test_evaluate_refuses_a_finished_run_trained_with_other_settings(tmp_path):
    first, other = smoke_gapg_runs("env.reward.alpha_c=0.2")
    evaluate(first, tmp_path)
    evaluate(first, tmp_path)  # the same settings: the finished run is reused
    with pytest.raises(CheckpointError, match="cannot evaluate .*step_000002: its env was"):
        evaluate(other, tmp_path)  # a changed reward must not be served the old run's policy


def test_a_run_saved_before_a_setting_existed_counts_as_that_settings_default(tmp_path):
    """A finished run whose state.json predates `agent.kl_anchor` is the same run at kl_anchor=0 (the
    estimator it trained with) and is reused; asked for kl_anchor>0 it is refused."""
    run, anchored = smoke_gapg_runs("agent.kl_anchor=0.1")
    evaluate(run, tmp_path)
    state_path = next((tmp_path / "runs").glob("gapg-*/seed0/checkpoints/step_000002/state.json"))
    state = json.loads(state_path.read_text())
    del state["config"]["agent"]["kl_anchor"]
    state_path.write_text(json.dumps(state))
    evaluate(run, tmp_path)
    with pytest.raises(CheckpointError, match="cannot evaluate .*step_000002: its agent was"):
        evaluate(anchored, tmp_path)
