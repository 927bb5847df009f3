"""Bad configuration and bad data fail at start-up, before any model weights are loaded, with a message
naming the field (or the file and line) and what it may be.

Every case goes through what `python -m agents.train` runs (`agents.train.train`: Hydra's composed
config, `to_objects`, `preflight`, then the trainer) with every way of building a model patched to
raise `WeightsLoaded`: a case that gets its clear error first has provably loaded nothing. A control
case checks that the patch does catch a run that gets as far as loading. One subprocess runs the
real Hydra command line for a few cases, to show what a user sees (exit status 1, the message on
stderr, nothing written but Hydra's own files).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gymnasium as gym
import pytest
import transformers
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

import agents.policy
import agents.train
import collab_env.models
from agents.registry import register_configs
from collab_env.errors import DatasetError, DatasetWarning, DeviceCloudError, PromptTooLongError
from collab_env.tasks import make_task

REPO = Path(__file__).resolve().parents[1]
CONFIGS = str(REPO / "configs")
UNSET_KEY = "DEVICECLOUD_TEST_UNSET_KEY"


class WeightsLoaded(Exception):
    """Raised by every patched way of building a model."""


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise WeightsLoaded("a model was about to be built or loaded")

    monkeypatch.setattr(collab_env.models, "load_model", refuse)
    monkeypatch.setattr(collab_env.models, "smollm2_model_dir", refuse)
    monkeypatch.setattr(agents.policy, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)
    monkeypatch.delenv(UNSET_KEY, raising=False)


def start(overrides: list[str], run_dir: Path) -> dict[str, float]:
    """Compose `configs/train.yaml` like the command line does and run the entry point's start-up."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        cfg = compose(config_name="train", overrides=["experiment=smoke", *overrides])
    return agents.train.train(cfg, run_dir)


def _jsonl(path: Path, rows: list[str]) -> str:
    path.write_text("\n".join(rows) + "\n")
    return str(path)


# (overrides, error type, fragments the message must contain: the field and the allowed values or fix)
CASES: list[tuple[str, list[str], type[Exception], list[str]]] = [
    ("unknown task", ["task.name=arithmatic"], DeviceCloudError, ["task.name", "arithmetic", "countdown"]),
    ("unknown cloud oracle", ["cloud.name=opneai"], DeviceCloudError, ["cloud.name", "openai, simulated"]),
    ("unknown agent", ["agent.name=gapgg"], DeviceCloudError, ["agent.name", "dr_grpo, gapg, grpo, ppo"]),
    ("agent name of another agent", ["agent=gapg", "agent.name=ppo"], DeviceCloudError, ["agent=ppo"]),
    ("unknown device model", ["device.name=gpt5"], DeviceCloudError, ["device.name", "tiny-random"]),
    ("negative budget ratio", ["budget.ratio=-0.1"], DeviceCloudError, ["budget.ratio=-0.1", "[0.0, 1.0]"]),
    ("budget ratio above 1", ["budget.ratio=1.5"], DeviceCloudError, ["budget.ratio=1.5", "[0.0, 1.0]"]),
    ("unknown budget mode", ["budget.mode=soft"], DeviceCloudError, ["budget.mode", "cap, none, penalty"]),
    ("group of one", ["train.group_size=1"], DeviceCloudError, ["train.group_size=1", "G >= 2"]),
    (
        "minibatches that do not divide the batch",
        ["agent=ppo", "agent.minibatches=3"],
        DeviceCloudError,
        ["agent.minibatches=3", "16 sequences", "1, 2, 4, 8, 16"],
    ),
    (
        "more minibatches than sequences",
        ["agent=grpo", "agent.minibatches=32"],
        DeviceCloudError,
        ["agent.minibatches=32", "1, 2, 4, 8, 16"],
    ),
    (
        "missing model directory",
        ["device=path", "device.path=/nope/model"],
        DeviceCloudError,
        ["device.path=/nope/model", "not a directory"],
    ),
    (
        "missing API-key variable",
        ["cloud=openai", "cloud.model=m", f"cloud.api_key_env={UNSET_KEY}"],
        DeviceCloudError,
        [f"cloud.api_key_env={UNSET_KEY}", "not set", "cloud.api_key_env=null"],
    ),
    (
        "missing API-key variable with a device built on first use",
        ["device=tiny-arith", "cloud=openai", "cloud.model=m", f"cloud.api_key_env={UNSET_KEY}"],
        DeviceCloudError,
        [f"cloud.api_key_env={UNSET_KEY}"],
    ),
    (
        "missing cloud model directory",
        ["cloud=transformers", "cloud.path=/nope/cloud"],
        DeviceCloudError,
        ["cloud.path=/nope/cloud", "not a directory"],
    ),
    (
        "missing dataset file",
        ["task=math_jsonl", "task.path=/nope/data.jsonl"],
        DeviceCloudError,
        ["/nope/data.jsonl", "task.path"],
    ),
    (
        "prompts longer than the prompt window",
        ["env.max_prompt_tokens=40"],
        DeviceCloudError,
        ["80 of 80 prompts", "env.max_prompt_tokens=40", "at least"],
    ),
    ("misspelt key", ["train.group_sise=4"], HydraException, ["group_sise"]),
    ("wrong type", ["train.group_size=four"], HydraException, ["train.group_size=four"]),
    ("unknown task option", ["task=arithmatic"], HydraException, ["task/arithmatic", "arithmetic"]),
    ("unknown agent option", ["agent=gapgg"], HydraException, ["agent/gapgg", "gapg"]),
]


@pytest.mark.parametrize(
    ("overrides", "error", "fragments"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_bad_config_fails_before_any_weights_with_a_clear_message(
    overrides, error, fragments, no_weights, tmp_path
):
    with pytest.raises(error) as raised:
        start(overrides, tmp_path / "run")
    message = str(raised.value)
    assert [f for f in fragments if f not in message] == [], message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_data_rows_fail_at_start_up_naming_file_and_line(no_weights, tmp_path):
    good = '{"problem": "1+1", "solution": "\\\\boxed{2}"}'
    path = _jsonl(tmp_path / "m.jsonl", [good, good.replace("1+1", "2+2"), '{"problem": "x"}'])
    with pytest.raises(DeviceCloudError, match=f"{path}:3: key 'solution' is missing"):
        start(["task=math_jsonl", f"task.path={path}"], tmp_path / "run")


def test_the_guard_catches_a_run_that_gets_as_far_as_loading(no_weights, tmp_path):
    """Without this control the cases above would also pass if the patch caught nothing."""
    with pytest.raises(WeightsLoaded):
        start([], tmp_path / "run")


_CLI = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys
    import transformers
    from hydra.core.global_hydra import GlobalHydra
    import agents.policy, collab_env.models

    def refuse(*args, **kwargs):
        raise RuntimeError("WEIGHTS LOADED")

    collab_env.models.load_model = agents.policy.load_model = refuse
    transformers.AutoModelForCausalLM.from_pretrained = transformers.AutoModelForCausalLM.from_config = refuse
    results = []
    for overrides in json.loads(sys.argv[1]):
        GlobalHydra.instance().clear()
        sys.argv = ["agents.train", *overrides]
        err = io.StringIO()
        code = 0
        with contextlib.redirect_stderr(err):
            try:  # what `python -m agents.train ...` runs; the patched modules stay imported
                runpy.run_module("agents.train", run_name="__main__", alter_sys=True)
            except SystemExit as exit:
                code = exit.code
        results.append({"code": code, "stderr": err.getvalue()})
    print(json.dumps(results))
    """
)


def test_the_command_line_exits_with_the_message_before_loading_weights(tmp_path):
    cases = [
        (["agent.name=gapgg"], "unknown agent 'gapgg' (agent.name)"),
        (["train.group_size=1"], "train.group_size=1"),
        (["device=path", "device.path=/nope/model"], "device.path=/nope/model is not a directory"),
        (
            ["cloud=openai", "cloud.model=m", f"cloud.api_key_env={UNSET_KEY}"],
            f"variable {UNSET_KEY} is not set",
        ),
        (["task=arithmatic"], "Could not find 'task/arithmatic'"),
    ]
    runs = [
        ["experiment=smoke", *overrides, f"hydra.run.dir={tmp_path / str(i)}"]
        for i, (overrides, _) in enumerate(cases)
    ]
    env = {k: v for k, v in os.environ.items() if k != UNSET_KEY}
    done = subprocess.run(
        [sys.executable, "-c", _CLI, json.dumps(runs)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (overrides, expected), result, i in zip(cases, results, range(len(cases)), strict=True):
        assert result["code"] == 1, (overrides, result)
        assert expected in result["stderr"], (overrides, result["stderr"])
        assert "WEIGHTS LOADED" not in result["stderr"]
        written = {p.name for p in (tmp_path / str(i)).iterdir()} if (tmp_path / str(i)).exists() else set()
        assert written <= {".hydra", "train.log"}, written


# ---------------------------------------------------------------------------------------------
# Bad data: a clear error naming the file and line, or a documented skip with a count; never a
# silent wrong score. (tests/test_tasks.py covers malformed JSON rows and missing keys.)


def test_a_line_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = b'{"problem": "1+1", "solution": "\\\\boxed{2}"}\n'
    path.write_bytes(good + good.replace(b"1+1", b"2+2") + '{"problem": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match=f"{path}:3: not UTF-8 text"):
        make_task({"name": "jsonl_math", "path": str(path)})


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    rows = [json.dumps({"nums": [2, 5], "target": 10}), json.dumps({"nums": [3, 4], "target": 12})]
    path = tmp_path / "bom.jsonl"
    path.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    task = make_task({"name": "jsonl_countdown", "path": str(path), "test_fraction": 0.5})
    assert len(task) == 2 and task.skipped == {}


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank lines"])
def test_an_empty_dataset_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match="0 training and 0 test problems.*both splits need at least one"):
        make_task({"name": "jsonl_math", "path": str(path)})


def test_rows_whose_answer_cannot_be_right_are_skipped_and_counted(tmp_path):
    rows = [
        {"nums": [2, 5], "target": 10},
        {"nums": [3, 4], "target": 12},
        {"nums": [1, 2], "target": 50},  # no expression of 1 and 2 reaches 50
        {"nums": [6, 7], "target": 42, "solution": "6 + 7"},  # a wrong given solution
        {"nums": [8, 9], "target": 72},
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.warns(
        DatasetWarning, match=r"skipped \d of \d (train|test) problems whose ground-truth answer"
    ):
        task = make_task({"name": "jsonl_countdown", "path": str(path), "test_fraction": 0.4})
    assert sum(task.skipped.values()) == 2 and len(task) == 3
    assert all(task.verify(p, p.answer) for p in task.problems("train") + task.problems("test"))
    unsolvable = tmp_path / "none.jsonl"
    unsolvable.write_text("\n".join(json.dumps({"nums": [1, 2], "target": 50 + i}) for i in range(4)) + "\n")
    with pytest.warns(DatasetWarning), pytest.raises(DatasetError, match="after skipping"):
        make_task({"name": "jsonl_countdown", "path": str(unsolvable)})


def test_prompts_longer_than_the_window_are_counted_at_start_up():
    def make(window: int):
        return gym.make(
            "DeviceCloud-v0",
            task={"name": "arithmetic", "num_train": 40, "num_test": 20},
            cloud={"name": "simulated", "cache_path": ":memory:"},
            max_prompt_tokens=window,
        ).unwrapped

    lengths = sorted(len(make(256).prompt_tokens(i)) for i in range(60))
    window = lengths[len(lengths) // 2]  # inside the range of prompt lengths: some fit, some do not
    too_long = sum(n > window for n in lengths)
    assert 0 < too_long < len(lengths)
    with pytest.raises(PromptTooLongError, match=rf"{too_long} of 60 prompts .* at least {lengths[-1]}"):
        make(window).check_prompts()


@pytest.mark.parametrize(
    "answer", ["", "1e5", "0x10", "½", "ninety", "92 apples", "9" * 80, "\x00", "NaN", "inf"]
)
def test_answers_the_verifier_cannot_parse_are_wrong_not_errors(answer):
    task = make_task({"name": "arithmetic", "num_train": 10, "num_test": 10})
    problem = task.problems("test")[0]
    assert task.verify(problem, answer) is False
    assert task.verify(problem, task.extract_answer(f"<answer>{answer}</answer>")) is False
