"""`evaluate.train_workers`: the runs a comparison needs train side by side first, each in its own
process, and give the same checkpoints and the same results as training them one after the other."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from test_train_smoke import compose_experiment

from agents.baselines import METHODS, RUNS
from agents.evaluate import evaluate
from collab_env.errors import ConfigError

METHODS_USED = "[task_tuning,oracle_router,gapg,gapg_calibrated]"


def compare(tmp_path, workers: int):
    run = compose_experiment(
        "smoke",
        [f"evaluate.methods={METHODS_USED}", "train.steps=2", f"evaluate.train_workers={workers}"],
        entry="evaluate",
    )
    out = tmp_path / f"workers{workers}"
    evaluate(run, out)
    return out, json.loads((out / "report" / "results.json").read_text())


def test_every_method_that_needs_a_run_names_it():
    # A new method must say which run it needs, or join the ones that need none.
    assert set(METHODS) - set(RUNS) == {
        "cloud_only",
        "device_only",
        "device_with_help",
        "device_with_help_calibrated",
    }
    assert set(RUNS) <= set(METHODS)
    assert RUNS["prompt_router"] == RUNS["task_tuning"] == ("grpo", "plain")
    assert RUNS["gapg_calibrated"] == RUNS["gapg"] == ("gapg", None)
    assert RUNS["da_grpo_calibrated"] == RUNS["da_grpo"] == ("da_grpo", None)


def test_parallel_training_matches_one_run_at_a_time(tmp_path):
    parallel_dir, parallel = compare(tmp_path, 2)
    serial_dir, serial = compare(tmp_path, 1)
    seconds = parallel["context"]["method_seconds"]["0"]
    assert (
        list(seconds)[0] == "training (parallel)"
        and "training (parallel)" not in serial["context"]["method_seconds"]["0"]
    )
    runs = sorted(p.relative_to(serial_dir) for p in serial_dir.glob("runs/*/seed0/checkpoints/step_000002"))
    assert [str(r.parent.parent.parent.name) for r in runs] == ["gapg-answer_tags", "grpo-plain"]
    for run in runs:
        for part in ("policy.safetensors", "optimizer.safetensors"):
            a, b = load_file(parallel_dir / run / part), load_file(serial_dir / run / part)
            assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), f"{run}/{part} differs"
    for name in ("task_tuning", "oracle_router", "gapg", "gapg_calibrated"):
        assert parallel["methods"][name]["metrics"] == serial["methods"][name]["metrics"], name


def test_train_workers_must_be_positive():
    with pytest.raises(ConfigError, match="train_workers"):
        compose_experiment("smoke", ["evaluate.train_workers=0"], entry="evaluate")
