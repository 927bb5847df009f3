"""The simulated oracle and the persistent answer cache: each request reaches the cloud once."""

from __future__ import annotations

from collab_env.cloud import AnswerCache, CachedOracle, make_oracle
from collab_env.cloud.simulated import SimulatedOracle
from collab_env.config import SimulatedCloudConfig
from collab_env.tasks import make_task

TASK = {"name": "arithmetic", "num_train": 200, "num_test": 50}


def test_cache_hit_means_no_second_query(tmp_path):
    task = make_task(TASK)
    oracle = make_oracle({"name": "simulated", "cache_path": str(tmp_path / "c.sqlite")}, task)
    problems = task.problems("train")[:5]
    first = oracle.answer(problems)
    assert oracle.stats.calls == 5 and oracle.stats.cache_hits == 0
    again = oracle.answer(problems + problems[:2])
    assert again[:5] == first and oracle.stats.calls == 5 and oracle.stats.cache_hits == 7


def test_cache_survives_a_new_process_and_keys_on_oracle_identity(tmp_path):
    path = str(tmp_path / "c.sqlite")
    task = make_task(TASK)
    problems = task.problems("test")[:4]
    make_oracle({"name": "simulated", "cache_path": path}, task).answer(problems)
    reopened = make_oracle({"name": "simulated", "cache_path": path}, task)
    reopened.answer(problems)
    assert reopened.stats.calls == 0 and reopened.stats.cache_hits == 4
    other = make_oracle({"name": "simulated", "cache_path": path, "accuracy": 0.5}, task)
    other.answer(problems)
    assert other.stats.calls == 4  # different sampling settings are different answers
    assert len(AnswerCache(path)) == 8


def test_simulated_oracle_is_deterministic_and_near_its_accuracy():
    task = make_task(TASK)
    config = SimulatedCloudConfig(accuracy=0.8, seed=3, cache_path=":memory:")
    problems = task.problems("train")

    def grade(oracle):
        answers = oracle.answer(problems)
        return [task.verify(p, task.extract_answer(a.text)) for p, a in zip(problems, answers, strict=True)]

    first = grade(CachedOracle(SimulatedOracle(config, task), AnswerCache(":memory:")))
    second = grade(CachedOracle(SimulatedOracle(config, task), AnswerCache(":memory:")))
    assert first == second
    assert 0.7 < sum(first) / len(first) < 0.9
    assert (
        0.2
        < sum(grade(make_oracle({"name": "simulated", "accuracy": 0.3, "cache_path": ":memory:"}, task)))
        / len(problems)
        < 0.4
    )


def test_env_queries_the_cloud_at_most_once_per_prompt(make_env):
    env = make_env()
    for _ in range(3):
        env.reset(options={"prompt_id": 4})
        env.step(env.unwrapped.help_action)
    assert env.unwrapped.cloud.stats.calls == 1 and env.unwrapped.cloud.stats.cache_hits == 2
