"""Tasks as datasets: `to_dataset` (TRL's conversational format), `python -m collab_env.export` (parquet in
verl's layout, read back by `datasets.load_dataset("parquet", ...)`), and the verl-style
`compute_score`, which agrees with the env's `score()` (tested without verl). Also the README's
quickstart, run as written with the tiny random model in place of SmolLM2."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import encode

from collab_env import HELP_MARKER, ConfigError, DatasetError, DependencyNotInstalled
from collab_env.env import DeviceCloudEnv
from collab_env.export import main as export_main
from collab_env.export import parse_overrides
from collab_env.integrations import verl
from collab_env.tasks import make_task, to_dataset

datasets = pytest.importorskip("datasets")
TASK = {"name": "arithmetic", "num_train": 30, "num_test": 10}


def test_to_dataset_has_the_env_prompts_in_chat_format(make_env):
    env = make_env(task=TASK).unwrapped
    dataset = to_dataset(env.task, "test")
    assert dataset.column_names == ["prompt", "answer", "level", "prompt_id", "question", "split"]
    problems = env.task.problems("test")
    assert dataset["prompt_id"] == [p.id for p in problems] and dataset["answer"] == [
        p.answer for p in problems
    ]
    first = dataset[0]
    assert [m["role"] for m in first["prompt"]] == ["system", "user"]
    rendered = env.tokenizer.apply_chat_template(
        first["prompt"], add_generation_prompt=True, return_dict=False
    )
    assert list(rendered) == env.prompt_tokens(first["prompt_id"]).tolist()  # what the env observes
    with pytest.raises(ConfigError, match="split"):
        to_dataset(env.task, "dev")
    with pytest.raises(ConfigError, match="make_task"):
        to_dataset("arithmetic")


def test_export_writes_parquet_that_load_dataset_reads_with_the_verl_fields(tmp_path, capsys):
    out = tmp_path / "data"
    written = export_main(
        ["task=arithmetic", "task.num_train=30", "task.num_test=10", "max_new_tokens=48", f"--out={out}"]
    )
    assert json.loads(capsys.readouterr().out) == {s: str(p) for s, p in written.items()}
    files = {split: str(out / f"{split}.parquet") for split in ("train", "test")}
    loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf"))
    task = make_task(TASK)
    for split in ("train", "test"):
        rows = loaded[split]
        assert set(rows.column_names) == {
            "data_source",
            "prompt",
            "ability",
            "reward_model",
            "extra_info",
            "prompt_id",
            "answer",
            "level",
        }
        problems = task.problems(split)
        assert len(rows) == len(problems)
        row, problem = rows[0], problems[0]
        assert row["data_source"] == "devicecloud/arithmetic" and row["ability"] == "math"
        assert row["prompt"] == task.messages(problem)
        assert row["reward_model"] == {"style": "rule", "ground_truth": problem.answer}
        info = row["extra_info"]
        assert {k: info[k] for k in ("split", "index", "prompt_id", "level", "question")} == {
            "split": split,
            "index": 0,
            "prompt_id": problem.id,
            "level": problem.level,
            "question": problem.question,
        }
        settings = json.loads(info["env"])
        assert settings["task"]["num_train"] == 30 and settings["max_new_tokens"] == 48
        assert (row["prompt_id"], row["answer"], row["level"]) == (problem.id, problem.answer, problem.level)


def test_export_refuses_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        export_main(["task", f"--out={tmp_path}"])
    with pytest.raises(ConfigError, match="unknown env setting"):
        export_main(["task=arithmetic", "split=train", f"--out={tmp_path}"])
    with pytest.raises(ConfigError, match="unknown task"):
        export_main(["task=arithmetc", f"--out={tmp_path}"])
    assert parse_overrides(["task=countdown", "task.num_train=5", "budget.ratio=0.5"]) == {
        "task": {"name": "countdown", "num_train": 5},
        "budget": {"ratio": 0.5},
    }


def test_a_missing_optional_dependency_names_the_extra(make_env, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if datasets were not installed
    with pytest.raises(DependencyNotInstalled, match=r"pip install 'devicecloud\[trl\]'"):
        to_dataset(make_env(task=TASK).unwrapped.task)
    with pytest.raises(DependencyNotInstalled, match="collab_env.export"):
        export_main(["task=arithmetic", f"--out={tmp_path}"])


def test_verl_compute_score_agrees_with_score_on_right_wrong_and_help_calls(tmp_path, cloud_cache):
    out = tmp_path / "data"
    export_main(
        ["task=arithmetic", "task.num_train=30", "task.num_test=10", "budget.mode=cap", f"--out={out}"]
    )
    rows = datasets.load_dataset(
        "parquet", data_files=str(out / "train.parquet"), cache_dir=str(tmp_path / "hf")
    )
    cloud = {"name": "simulated", "cache_path": cloud_cache}  # verl's reward_kwargs override the export
    env = DeviceCloudEnv(task=TASK, cloud=cloud, budget={"mode": "cap"})
    outcomes = set()
    for row in rows["train"]:
        truth = row["reward_model"]["ground_truth"]
        for text in (
            f"<think>easy</think> <answer>{truth}</answer>",
            f"<answer>{int(truth) + 1}</answer>",
            f"Hmm. {HELP_MARKER}",
            "I need external assistance",  # the lenient, untagged call
        ):
            args = (row["data_source"], text, truth, row["extra_info"])
            assert verl.compute_score(*args, cloud=cloud) == env.score(row["prompt_id"], encode(env, text))[0]
            _, verl_info = verl.score_response(*args[1:], cloud=cloud)
            _, info = env.score(row["prompt_id"], encode(env, text))
            assert verl_info == info
            outcomes.add(info["outcome"])
    assert outcomes >= {"local_correct", "wrong", "cloud_correct", "over_budget"}
    scorer_env = verl.env_for(rows["train"][0]["extra_info"], cloud=cloud)
    assert (scorer_env.budget.calls, scorer_env.budget.episodes) == (env.budget.calls, env.budget.episodes)
    assert "verl" not in sys.modules


def test_verl_compute_score_refuses_rows_of_other_task_settings(tmp_path, cloud_cache):
    out = tmp_path / "data"
    export_main(["task=arithmetic", "task.num_train=30", "task.num_test=10", f"--out={out}"])
    row = datasets.load_dataset(
        "parquet", data_files=str(out / "test.parquet"), cache_dir=str(tmp_path / "hf")
    )
    row = row["train"][0]
    cloud = {"name": "simulated", "cache_path": cloud_cache}
    with pytest.raises(DatasetError, match="ground truth"):
        verl.compute_score(
            row["data_source"], "<answer>1</answer>", "not the answer", row["extra_info"], cloud=cloud
        )
    with pytest.raises(DatasetError, match="collab_env.export"):
        verl.compute_score("devicecloud/arithmetic", "<answer>1</answer>", "1", {"index": 0})


def test_the_readme_quickstart_runs(cloud_cache):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Using the environment", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) < 25
    tiny = '{"name": "tiny-random", "dtype": "float32"}'
    code = code.replace('load_model("smollm2")', f"load_model({tiny})").replace(
        'device="smollm2"', f"device={tiny}"
    )
    code = code.replace(
        'cloud={"name": "simulated"}', f'cloud={{"name": "simulated", "cache_path": {cloud_cache!r}}}'
    )
    assert tiny in code and cloud_cache in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README quickstart", "exec"), {})
    rows = [line.split() for line in printed.getvalue().splitlines()]
    assert sum(int(count) for *_, count in rows) == 4 and all(len(row) == 3 for row in rows)
