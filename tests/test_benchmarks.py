"""benchmarks: every run records its setting and writes every round's result as JSON; the rollout
workloads decode the batches they describe, and main-job's match the main experiment's config."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from benchmarks import common, rollout
from collab_env.config import DeviceConfig


def test_spread_is_median_min_max():
    assert common.spread([3.0, 1.0, 10.0, 2.0]) == {"median": 2.5, "min": 1.0, "max": 10.0}
    assert common.spread([5.0, 1.0, 4.0]) == {"median": 4.0, "min": 1.0, "max": 5.0}
    assert common.spread([7.0]) == {"median": 7.0, "min": 7.0, "max": 7.0}


def recorded(tmp_path, argv: list[str]) -> tuple[dict, argparse.Namespace]:
    args = common.benchmark_parser(None).parse_args(argv)
    config = DeviceConfig(name="path", path=str(tmp_path / "model"), dtype="float32")
    return {"setting": common.run_setting("bench", args, argv, "cpu", config), "rounds": [1.0, 2.0]}, args


def test_save_results_writes_the_setting_to_json(tmp_path):
    target = tmp_path / "out" / "run.json"
    argv = ["--model", "qwen2-tiny-random", "--json", str(target)]
    results, args = recorded(tmp_path, argv)
    assert common.save_results("bench-qwen2-tiny-random", results, args) == target
    saved = json.loads(target.read_text())
    setting = saved["setting"]
    assert saved["rounds"] == [1.0, 2.0]
    assert set(setting["load_avg_before"]) == {"1m", "5m", "15m"}
    assert all(value >= 0 for value in setting["load_avg_before"].values())
    assert setting["load_avg_1m_after"] >= 0
    assert setting["argv"] == argv and setting["args"]["model"] == "qwen2-tiny-random"
    assert setting["args"]["json"] == str(target)
    assert setting["dtype"] == "torch.float32" and setting["model_dir"] == str(tmp_path / "model")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", setting["started_utc"])
    assert re.fullmatch(r"[0-9a-f]{7,}(-dirty)?", setting["commit"])  # the tests run in the checkout
    assert {"cpu_flags", "threads", "torch", "transformers"} <= set(setting)


def test_save_results_default_path_and_no_save(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    results, args = recorded(tmp_path, [])
    path = common.save_results("bench-smollm2", results, args)
    stamp = results["setting"]["started_utc"].replace("-", "").replace(":", "").removesuffix("Z")
    assert path == tmp_path / "results" / f"bench-smollm2-{stamp}.json"
    assert json.loads(path.read_text())["setting"]["load_avg_1m_after"] >= 0

    results, args = recorded(tmp_path, ["--no-save"])
    assert common.save_results("bench-other", results, args) is None
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [path.name]


def test_git_commit_outside_a_checkout_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setattr(common, "REPO", tmp_path)
    assert common.git_commit() is None


def resolved(argv: list[str]) -> list[tuple[int, int]]:
    parser = rollout.rollout_parser()
    return rollout.resolve_workload(parser.parse_args(argv), parser)


def test_workload_values_and_overrides():
    assert resolved([]) == [(32, 8), (128, 8)]
    assert resolved(["--workload", "eval"]) == [(32, 1), (128, 1)]
    assert resolved(["--workload", "main-job"]) == [(128, 8), (256, 1)]
    assert resolved(["--workload", "eval", "--batches", "8", "16"]) == [(8, 1), (16, 1)]
    assert resolved(["--group-size", "4"]) == [(32, 4), (128, 4)]
    assert resolved(["--workload", "main-job", "--batches", "64", "--group-size", "8"]) == [(64, 8)]
    parser = rollout.rollout_parser()
    args = parser.parse_args(["--workload", "main-job", "--model", "smollm2", "--new-tokens", "3"])
    rollout.resolve_workload(args, parser)
    assert (args.model, args.new_tokens) == ("smollm2", 3)
    with pytest.raises(SystemExit):  # main-job's batches differ in G: which one a new batch takes is unsaid
        resolved(["--workload", "main-job", "--batches", "64"])
    with pytest.raises(SystemExit):
        resolved(["--batches", "12"])  # 12 rows are no whole number of groups of 8


def test_main_job_workload_is_the_main_experiments():
    run = common.experiment_run("arithmetic_cpu")
    workload = rollout.WORKLOADS["main-job"]
    assert workload.experiment == common.MODELS[workload.model].experiment == "arithmetic_cpu"
    assert run.device.name == "tiny-arith" and run.cloud.cache_path == ":memory:"
    assert workload.new_tokens == run.env.max_new_tokens
    assert workload.batches == (
        (run.train.prompts_per_step * run.train.group_size, run.train.group_size),
        (run.evaluate.max_batch, 1),
    )


def test_rollout_eval_keeps_every_round(tmp_path):
    target = tmp_path / "rollout.json"
    argv = ["--model", "qwen2-tiny-random", "--workload", "eval", "--batches", "8", "--repeats", "2"]
    argv += ["--new-tokens", "4", "--no-vllm", "--json", str(target)]
    rollout.main(argv)
    saved = json.loads(target.read_text())
    assert saved["workload"] == {
        "name": "eval",
        "model": "qwen2-tiny-random",
        "new_tokens": 4,
        "batches": [[8, 1]],
        "repeats": 2,
    }
    assert saved["setting"]["argv"] == argv and "load_avg_1m_after" in saved["setting"]
    (batch,) = saved["batches"]
    assert (batch["rows"], batch["group_size"], batch["split"]) == (8, 1, "test")
    assert len(set(batch["row_prompt_ids"])) == 8  # G=1: every row its own prompt
    engines = batch["engines"]
    assert set(engines) == {"transformers generate", "ours (hf)"}
    for values in engines.values():
        rounds = values["tok_s_rounds"]
        assert len(rounds) == 2 and all(r > 0 for r in rounds)
        assert values["tok_s"] == common.spread(rounds)
    ours, peer = engines["ours (hf)"]["tok_s_rounds"], engines["transformers generate"]
    assert peer["ours_over_rounds"] == pytest.approx(
        [a / b for a, b in zip(ours, peer["tok_s_rounds"], strict=True)]
    )
    assert peer["ours_over"] == common.spread(peer["ours_over_rounds"])
    assert "ours_over" not in engines["ours (hf)"]
