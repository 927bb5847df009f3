"""Every agent trains end to end on the smoke preset; a killed run resumes to identical parameters."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from agents.checkpoint import list_checkpoints
from agents.registry import register_configs, to_objects
from agents.trainer import Trainer
from collab_env.errors import ConfigError

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
REPO = Path(__file__).resolve().parents[1]


def smoke_run(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return to_objects(compose(config_name="train", overrides=["experiment=smoke", *overrides]))


@pytest.mark.parametrize("agent", ["gapg", "grpo", "dr_grpo", "ppo"])
def test_smoke_training_runs_for_each_agent(agent, tmp_path):
    extra = {"gapg": "agent.filtering=false", "ppo": "agent.ent_coef=0.05"}.get(agent, "train.lr=1e-3")
    run = smoke_run([f"agent={agent}", extra])
    trainer = Trainer(run, tmp_path)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    metrics = trainer.fit()
    with (tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert {"env/reward", "env/help_rate", "train/step_time", "eval/accuracy"} <= set(rows[-1])
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert (tmp_path / "samples.jsonl").read_text().count("\n") == 3 * run.train.log_samples
    if agent == "ppo":  # PPO trains its value head and entropy even when every reward is zero
        after = trainer.policy.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)


def test_bad_override_fails_before_anything_loads():
    with pytest.raises(Exception, match="agent.set1_rule"):
        smoke_run(["agent=gapg", "agent.set1_rule=sometimes"])
    with pytest.raises(Exception, match="group_size"):
        smoke_run(["train.group_size=1"])
    with pytest.raises(Exception, match="set1rule"):
        smoke_run(["agent=gapg", "agent.set1rule=mixed"])


def _train_command(run_dir: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "agents.train", "experiment=smoke", "agent=ppo", "agent.ent_coef=0.05",
        f"train.steps={steps}", "train.save_every=1", "train.keep_last=10", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    # One intra-op thread: with two, float reductions can differ between processes in the 7th digit.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    steps = 6
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(
        _train_command(straight, steps), cwd=REPO, env=env, check=True, capture_output=True, timeout=600
    )

    process = subprocess.Popen(
        _train_command(killed, steps), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_000002" / "state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "final_metrics.json").exists()
    resumed_from = max(int(p.name.split("_")[1]) for p in list_checkpoints(killed))
    assert resumed_from < steps

    subprocess.run(
        _train_command(killed, steps), cwd=REPO, env=env, check=True, capture_output=True, timeout=600
    )
    final_straight = load_file(str(straight / "checkpoints" / f"step_{steps:06d}" / "policy.safetensors"))
    final_killed = load_file(str(killed / "checkpoints" / f"step_{steps:06d}" / "policy.safetensors"))
    assert final_straight.keys() == final_killed.keys()
    for name, value in final_straight.items():
        assert torch.equal(value, final_killed[name]), name
    with (killed / "metrics.csv").open() as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == list(range(1, steps + 1))


def test_half_written_checkpoints_are_never_loaded(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step_000009.tmp-123").mkdir(parents=True)
    (root / ".step_000009.tmp-123" / "state.json").write_text("{}")
    (root / "step_000010").mkdir()  # no state.json: the rename never happened
    (root / "step_000004").mkdir()
    (root / "step_000004" / "state.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004"]


def compose_experiment(name: str, overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return to_objects(compose(config_name="train", overrides=[f"experiment={name}", *overrides]))


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        # paper-spec section 5.3: |D_b|, G, lr, steps, response and prompt lengths, alpha_c
        ("countdown_paper", ["device.path=/models/qwen"], (32, 8, 5e-6, 800, 720, 256, 0.25)),
        ("math_paper", ["device.path=/m", "task.path=/d.jsonl"], (128, 8, 2e-6, 800, 1024, 1024, 0.3)),
    ],
)
def test_paper_presets_carry_the_papers_settings(name, overrides, expected):
    run = compose_experiment(name, overrides)
    train, env = run.train, run.env
    got = (train.prompts_per_step, train.group_size, train.lr, train.steps)
    got += (env.max_new_tokens, env.max_prompt_tokens, env.reward.alpha_c)
    assert got == expected
    assert run.budget.share == pytest.approx(0.3) and run.rollout.temperature == 1.0
    assert run.agent.name == "gapg" and run.device.path == overrides[0].split("=")[1]


def test_presets_name_what_they_still_need():
    with pytest.raises(ConfigError, match="needs device.path"):
        compose_experiment("countdown_paper", [])
    run = compose_experiment("arithmetic_smollm2", [])
    assert run.device.name == "smollm2" and run.warmup is not None and run.warmup.name == "format_sft"
    main, long = compose_experiment("arithmetic_cpu", []), compose_experiment("arithmetic_cpu_long", [])
    assert (long.train.steps, long.train.lr, long.name) == (600, 2e-4, "arithmetic_cpu_long")
    assert long.env == main.env and long.device == main.device and long.task == main.task
