"""The `transformers` oracle on a tiny random model directory built here (no model hub)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SMALL_TASK
from transformers import AutoModelForCausalLM

from collab_env.cloud import make_oracle
from collab_env.cloud.base import SHARED_MODELS
from collab_env.cloud.settings import TransformersCloudConfig
from collab_env.config import DeviceConfig
from collab_env.errors import CloudError
from collab_env.models import load_tokenizer, tiny_llama_config
from collab_env.tasks import make_task


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """A tiny model gains nothing from two threads, and on a shared 2-core machine the second
    thread's spin-waits made `generate` 10-20x slower (measured while other jobs ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA with large random weights, so greedy answers differ from prompt to prompt
    (at the default init scale every prompt decodes to the same newline)."""
    directory = tmp_path_factory.mktemp("tiny-cloud")
    tokenizer = load_tokenizer("tiny-random")
    config = tiny_llama_config(DeviceConfig(name="tiny-random"), len(tokenizer), tokenizer)
    config.initializer_range = 0.5
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def task():
    return make_task(SMALL_TASK)


def settings(model_dir: Path, cache: Any = ":memory:", **overrides: Any) -> dict[str, Any]:
    base = {
        "name": "transformers",
        "path": str(model_dir),
        "max_new_tokens": 8,
        "dtype": "float32",
        "device": "cpu",
    }
    return base | {"cache_path": str(cache)} | overrides


def count_generate(oracle: Any, monkeypatch) -> list[int]:
    """Batch sizes of the model's `generate` calls from now on."""
    sizes: list[int] = []
    model = oracle.oracle.model
    generate = model.generate

    def counted(**kwargs: Any) -> Any:
        sizes.append(kwargs["input_ids"].shape[0])
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", counted)
    return sizes


def test_batched_left_padded_greedy_matches_one_by_one(model_dir, task, monkeypatch):
    problems = task.problems("train")[:7]
    batched = make_oracle(settings(model_dir, batch_size=3), task)
    sizes = count_generate(batched, monkeypatch)
    answers = batched.answer(problems)
    assert sizes == [3, 3, 1]
    single = make_oracle(settings(model_dir, batch_size=1), task).answer(problems)
    assert len({len(batched.oracle.tokenizer(batched.oracle._prompt(p)).input_ids) for p in problems}) > 1
    assert [a.text for a in answers] == [a.text for a in single]  # padding did not change an answer
    assert len({a.text for a in answers}) > 1
    assert make_oracle(settings(model_dir, batch_size=3), task).answer(problems) == answers  # greedy


def test_stats_and_cache_hit_on_the_second_call(model_dir, task, tmp_path, monkeypatch):
    problems = task.problems("test")[:5]
    cache = tmp_path / "c.sqlite"
    oracle = make_oracle(settings(model_dir, cache, batch_size=4), task)
    answers = oracle.answer(problems)
    stats = oracle.stats
    tokenizer = oracle.oracle.tokenizer
    prompt_tokens = sum(
        len(tokenizer(oracle.oracle._prompt(p), add_special_tokens=False).input_ids) for p in problems
    )
    assert (stats.calls, stats.cache_hits, stats.errors) == (5, 0, 0)
    assert stats.prompt_tokens == prompt_tokens
    assert 5 <= stats.completion_tokens <= 5 * 8 and stats.latency_s > 0

    again = make_oracle(settings(model_dir, cache, batch_size=4), task)
    sizes = count_generate(again, monkeypatch)
    assert again.answer(problems) == answers
    assert (again.stats.calls, again.stats.cache_hits, sizes) == (0, 5, [])
    other = make_oracle(settings(model_dir, cache, batch_size=4, max_new_tokens=4), task)
    other.answer(problems[:1])
    assert other.stats.calls == 1  # other sampling settings are other answers


def test_sampling_is_seeded_and_leaves_the_callers_rng_alone(model_dir, task):
    problems = task.problems("train")[:4]
    sampled = settings(model_dir, temperature=1.0, seed=3)
    torch.manual_seed(123)
    first = make_oracle(sampled, task).answer(problems)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # generation did not consume the caller's random state
    assert make_oracle(sampled, task).answer(problems) == first
    greedy = make_oracle(settings(model_dir), task).answer(problems)
    assert [a.text for a in first] != [a.text for a in greedy]


def test_a_failed_generation_raises_or_scores_wrong(model_dir, task, monkeypatch):
    problems = task.problems("train")[:3]

    def out_of_memory(**kwargs: Any) -> Any:
        raise RuntimeError("out of memory (injected)")

    raising = make_oracle(settings(model_dir, batch_size=2), task)
    monkeypatch.setattr(raising.oracle.model, "generate", out_of_memory)
    with pytest.raises(CloudError, match="failed on a batch of 2: out of memory.*cloud.batch_size"):
        raising.answer(problems)

    lenient = make_oracle(settings(model_dir, batch_size=2, on_error="score_wrong"), task)
    monkeypatch.setattr(lenient.oracle.model, "generate", out_of_memory)
    answers = lenient.answer(problems)
    assert [a.text for a in answers] == [None] * 3 and "out of memory" in answers[0].error
    assert (lenient.stats.errors, lenient.stats.calls, len(lenient.cache)) == (3, 0, 0)


def test_oracles_of_one_model_share_it_until_the_last_closes(model_dir, task, tmp_path):
    own_dir = shutil.copytree(model_dir, tmp_path / "model")  # a model no other test's oracle holds
    first, second = make_oracle(settings(own_dir), task), make_oracle(settings(own_dir), task)
    key = first.oracle._model_key
    assert first.oracle.model is second.oracle.model  # a run's train and eval envs load it once
    first.close()
    assert key in SHARED_MODELS
    assert second.answer(task.problems("test")[:1])[0].text is not None
    second.close()
    assert key not in SHARED_MODELS  # freed with the last user
    other = make_oracle(settings(own_dir, dtype="bfloat16"), task)
    assert other.oracle.model.dtype == torch.bfloat16  # other settings, another copy
    other.close()


def test_an_episode_with_the_transformers_cloud(model_dir, make_env):
    env = make_env(cloud=settings(model_dir))
    env.reset(seed=0, options={"prompt_id": 2})
    _, reward, _, _, info = env.step(env.unwrapped.help_action)
    assert info["called_cloud"] and env.unwrapped.cloud.stats.calls == 1
    assert info["outcome"] == "wrong" and reward == 0.0  # a random model does not know arithmetic
    env.close()


def test_hydra_option_builds_the_transformers_config(model_dir):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from agents.registry import register_configs

    register_configs()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(overrides=["+cloud=transformers", f"cloud.path={model_dir}"])
    built = OmegaConf.to_object(cfg.cloud)
    assert isinstance(built, TransformersCloudConfig)
    assert (built.path, built.temperature, built.batch_size) == (str(model_dir), 0.0, 8)
