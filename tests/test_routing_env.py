"""DeviceCloudRouting-v0: env checkers, budget cap and action masks, reward parity with DeviceCloud-v0,
and the on-disk caches of device answers and prompt features."""

from __future__ import annotations

import json
import os

import gymnasium as gym
import numpy as np
import pytest
from conftest import SMALL_TASK
from gymnasium.utils.env_checker import check_env

import collab_env.routing_env as routing
from collab_env import HELP_MARKER, IllegalActionError
from collab_env.features import NGRAM_DIM, greedy_completions, task_identity
from collab_env.routing_env import CLOUD_ACTION, DEVICE_ACTION, scripted_device
from collab_env.tasks import make_task

EASY = ("add2", "add2_carry", "mul21")
TINY_DEVICE = {"name": "tiny-random", "dtype": "float32"}


@pytest.fixture
def make_routing(cloud_cache, tmp_path):
    """`make_routing(**kwargs)`: the routing env on a small task, a scripted device and per-test caches."""

    def make(**kwargs):
        kwargs.setdefault("task", SMALL_TASK)
        kwargs.setdefault("features", "ngrams")
        kwargs.setdefault("cache_dir", str(tmp_path / "routing"))
        if "device" not in kwargs:
            kwargs.setdefault("device_answers", scripted_device(EASY))
        return gym.make(
            "DeviceCloudRouting-v0", cloud={"name": "simulated", "cache_path": cloud_cache}, **kwargs
        )

    return make


def test_passes_gymnasium_and_sb3_env_checkers(make_routing):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = make_routing(render_mode="ansi")
    check_env(env.unwrapped)
    sb3_check_env(env.unwrapped)
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (NGRAM_DIM + 2,)
    assert env.observation_space.contains(obs)
    env.step(CLOUD_ACTION)
    assert "cloud" in env.render()


def test_registered_under_module_prefix(cloud_cache):
    env = gym.make(
        "collab_env:DeviceCloudRouting-v0",
        task=SMALL_TASK,
        features="ngrams",
        device_answers=scripted_device(EASY),
        cloud={"name": "simulated", "cache_path": cloud_cache},
    )
    assert env.action_space == gym.spaces.Discrete(2)


def test_cap_refuses_calls_past_the_budget_and_masks_the_cloud(make_routing):
    # rho = 3/7 over a window of 10 episodes admits floor(0.3 * 10) = 3 cloud calls.
    env = make_routing(budget={"mode": "cap", "ratio": 3 / 7, "window": 10})
    unwrapped = env.unwrapped
    env.reset(seed=0)
    hard = [p.id for p in unwrapped.task.problems("train") if p.level not in EASY][:5]
    called, masks = [], []
    for prompt_id in hard:
        env.reset(options={"prompt_id": prompt_id})
        masks.append(bool(unwrapped.action_masks()[CLOUD_ACTION]))
        obs, reward, terminated, truncated, info = env.step(CLOUD_ACTION)
        called.append(info["called_cloud"])
        assert terminated and not truncated
    assert called == [True, True, True, False, False]
    assert masks == [True, True, True, False, False]
    # A refused call is answered by the device, whose answer to a hard prompt is wrong.
    assert info["outcome"] == "over_budget" and reward == 0.0 and info["called_help"]
    assert obs[-2:] == pytest.approx([0.3, 3 / 5])
    assert unwrapped.action_masks()[DEVICE_ACTION]


def test_masks_never_block_the_cloud_outside_cap_mode(make_routing):
    env = make_routing(budget={"mode": "train"})
    env.reset(seed=0)
    for _ in range(6):
        assert env.unwrapped.action_masks().tolist() == [True, True]
        env.step(CLOUD_ACTION)
        env.reset()


@pytest.mark.parametrize("reward", [{"version": "v3"}, {"version": "v1"}, {"alpha_c": 0.5}])
def test_reward_per_action_matches_the_token_env(make_routing, make_env, reward):
    # The scripted device writes <think> so that the v1 format reward is exercised too.
    scripted = scripted_device(EASY)
    answers = lambda problem: f"<think>sum</think> {scripted(problem)}"  # noqa: E731
    env = make_routing(device_answers=answers, reward=reward, budget={"mode": "none"})
    token_env = make_env(reward=reward, budget={"mode": "none"})
    unwrapped, token = env.unwrapped, token_env.unwrapped
    seen_rewards = set()
    for problem in unwrapped.task.problems("test")[:10]:
        completion = unwrapped.device_completion(problem.id)
        env.reset(options={"prompt_id": problem.id})
        _, local_reward, _, _, local_info = env.step(DEVICE_ACTION)
        assert (local_reward, local_info) == token.score(problem.id, completion)
        assert local_info["local_correct"] == (problem.level in EASY) == unwrapped.device_correct(problem.id)

        env.reset(options={"prompt_id": problem.id})
        _, cloud_reward, _, _, cloud_info = env.step(CLOUD_ACTION)
        token_reward, token_info = token.score(problem.id, [token.help_action])
        assert cloud_reward == token_reward
        for key in ("called_help", "called_cloud", "cloud_correct", "cloud_answer", "correct", "outcome"):
            assert cloud_info[key] == token_info[key], key
        seen_rewards |= {local_reward, cloud_reward}
    assert len(seen_rewards) >= 3  # correct and wrong device answers, and cloud answers, were compared


def test_a_call_for_help_written_by_the_device_is_ignored_on_device_action(make_routing):
    env = make_routing(device_answers=lambda problem: HELP_MARKER, budget={"mode": "none"})
    env.reset(seed=0)
    _, reward, _, _, info = env.step(DEVICE_ACTION)
    assert reward == 0.0 and not info["called_help"] and not info["called_cloud"]
    assert info["outcome"] == "wrong" and info["local_answer"] is None


def test_the_oracle_knows_a_device_that_writes_an_answer_then_calls_is_not_right(make_routing):
    """numbered_steps has no answer stop: a boxed right answer followed by the marker is a call, and a
    call gives up the device's own answer (the env's info says so; device_correct must agree)."""
    env = make_routing(
        task={"name": "arithmetic", "num_train": 40, "num_test": 10, "template": "numbered_steps"},
        device_answers=lambda problem: f"Step 1: \\boxed{{{problem.answer}}} {HELP_MARKER}",
        budget={"mode": "none"},
    ).unwrapped
    env.reset(seed=0, options={"prompt_id": 0})
    _, _, _, _, info = env.step(DEVICE_ACTION)
    assert not info["local_correct"] and not env.device_correct(0)


def test_rejects_illegal_actions_and_steps_after_the_end(make_routing):
    env = make_routing().unwrapped
    env.reset(seed=0)
    for action in (2, -1, 0.5, "1", float("inf"), np.array([1]), None):
        with pytest.raises(IllegalActionError, match="Discrete"):
            env.step(action)
    env.step(np.int64(0))
    with pytest.raises(IllegalActionError, match="reset"):
        env.step(0)


def test_a_reset_that_raises_changes_nothing(make_routing):
    env = make_routing().unwrapped
    env.reset(seed=0)
    env.step(CLOUD_ACTION)
    state = env.np_random.bit_generator.state
    for seed, options in ((3, {"prompt_id": "x"}), (3, {"split": "dev"}), (-1, None)):
        with pytest.raises(ValueError, match="prompt_id|split|seed"):
            env.reset(seed=seed, options=options)
    assert (env.budget.episodes, env.budget.calls) == (1, 1)
    assert env.np_random.bit_generator.state == state


def test_missing_device_answers_name_the_prompt_ids(make_routing):
    with pytest.raises(ValueError, match="device_answers has no completion for .* prompt id"):
        make_routing(device_answers={0: "<answer>1</answer>"})


def test_device_answers_and_features_are_generated_once_then_read_from_the_cache(make_routing, monkeypatch):
    task = {"name": "arithmetic", "num_train": 6, "num_test": 4}
    first = make_routing(task=task, device=TINY_DEVICE, max_new_tokens=4, features="device").unwrapped
    completions = [first.device_completion(i) for i in range(10)]
    assert all(1 <= len(c) <= 4 for c in completions)
    obs, _ = first.reset(seed=0)
    assert obs.shape == (64 + 2,)  # the tiny model's hidden size, then the budget

    def forbidden(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(routing, "greedy_completions", forbidden)
    monkeypatch.setattr(routing, "device_features", forbidden)
    monkeypatch.setattr(routing, "load_model", forbidden)
    again = make_routing(task=task, device=TINY_DEVICE, max_new_tokens=4, features="device").unwrapped
    assert [again.device_completion(i) for i in range(10)] == completions
    np.testing.assert_array_equal(again.reset(seed=0)[0], obs)
    # Another generation length is another cache entry.
    with pytest.raises(AssertionError, match="cache was not used"):
        make_routing(task=task, device=TINY_DEVICE, max_new_tokens=5, features="device")


def test_batched_greedy_generation_matches_one_prompt_at_a_time(make_env):
    from collab_env.models import load_model

    env = make_env(device=TINY_DEVICE).unwrapped
    model = load_model(TINY_DEVICE)
    prompts = [env.prompt_tokens(p.id) for p in env.task.problems("train")[:4]]
    prompts[1] = prompts[1][3:]  # a shorter row, so the batch is left-padded
    args = (env.start_completion, 6, int(env.tokenizer.pad_token_id), len(env.tokenizer))
    batched = greedy_completions(model, prompts, *args, batch_size=4)
    single = [greedy_completions(model, [p], *args, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(len(c) == 6 for c in batched)


def test_minilm_features_are_unit_sentence_embeddings_cached_on_disk(make_routing, monkeypatch):
    task = {"name": "arithmetic", "num_train": 5, "num_test": 5}
    env = make_routing(task=task, features="minilm").unwrapped
    features = np.stack([env.reset(options={"prompt_id": i})[0][:-2] for i in range(10)])
    assert features.shape == (10, 384)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    assert len({f.tobytes() for f in features}) == 10
    monkeypatch.setattr(routing, "minilm_features", lambda *a, **k: pytest.fail("features recomputed"))
    again = make_routing(task=task, features="minilm").unwrapped
    np.testing.assert_array_equal(again.reset(options={"prompt_id": 3})[0][:-2], features[3])


def test_cache_key_changes_with_the_questions_even_when_the_file_stamp_does_not(tmp_path):
    path = tmp_path / "m.jsonl"

    def write(numbers: range) -> dict:
        rows = [{"problem": f"What is {i}+1?", "solution": f"$\\boxed{{{i + 1}}}$"} for i in numbers]
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        os.utime(path, ns=(0, 0))  # the same size and modification time for both versions
        return task_identity(make_task({"name": "jsonl_math", "path": str(path)}))

    first = write(range(10, 20))
    assert write(range(10, 20)) == first
    second = write(range(30, 40))  # same lengths, other questions
    assert second["files"] == first["files"] and second != first


def test_answers_are_generated_lazily_for_the_prompts_the_seeded_draw_picks(
    make_routing, tmp_path, monkeypatch
):
    """A reset that draws an unanswered prompt answers it together with the next prompts the env's RNG
    will draw (`prefetch` in all), so the following resets need no model call; what is generated goes to
    the disk cache per prompt and equals a full pass."""
    task = {"name": "arithmetic", "num_train": 40, "num_test": 10}
    calls = []

    def counting(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return greedy_completions(model, prompts, *args, **kwargs)

    monkeypatch.setattr(routing, "greedy_completions", counting)
    kwargs = {"task": task, "device": TINY_DEVICE, "max_new_tokens": 4, "prefetch": 5}
    env = make_routing(**kwargs).unwrapped
    assert calls == []  # making the env loads the model but answers nothing
    drawn = [env.reset(seed=3)[1]["prompt_id"]]
    assert calls == [5]
    for _ in range(4):
        env.step(DEVICE_ACTION)
        drawn.append(env.reset()[1]["prompt_id"])
    assert calls == [5]  # the next four draws were answered in the first batch
    assert len(env._runs) == 5 and set(drawn) <= set(env._runs)
    for _ in range(20):  # later draws: a model call exactly when a drawn prompt is not answered yet
        env.step(DEVICE_ACTION)
        answered, before = set(env._runs), len(calls)
        prompt_id = env.reset()[1]["prompt_id"]
        assert len(calls) == before + (prompt_id not in answered)
    assert len(calls) > 1 and all(n == 5 for n in calls)

    monkeypatch.setattr(routing, "greedy_completions", lambda *a, **k: pytest.fail("answers regenerated"))
    monkeypatch.setattr(routing, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    again = make_routing(**kwargs).unwrapped
    cached = sorted(again._runs)
    assert len(cached) == 5 * len(calls)
    lazy = {i: again.device_completion(i) for i in cached}
    monkeypatch.undo()
    full = make_routing(**kwargs, cache_dir=str(tmp_path / "full")).unwrapped  # a full pass from scratch
    full.precompute()
    assert full._model is None and len(full._runs) == len(full._problems)
    assert lazy == {i: full.device_completion(i) for i in cached}


def test_minilm_features_are_computed_for_the_drawn_prompts_only(make_routing, monkeypatch):
    computed = []

    def counting(texts, *args, **kwargs):
        computed.append(len(texts))
        return routing_minilm(texts, *args, **kwargs)

    routing_minilm = routing.minilm_features
    monkeypatch.setattr(routing, "minilm_features", counting)
    env = make_routing(features="minilm", prefetch=8).unwrapped  # SMALL_TASK: 100 prompts
    obs, info = env.reset(seed=0)
    assert computed == [8] and obs.shape == (384 + 2,)
    env.reset(options={"prompt_id": info["prompt_id"]})
    assert computed == [8]


def test_a_full_cache_written_by_earlier_versions_is_read(make_routing, tmp_path, monkeypatch):
    from collab_env.features import device_answers_key, digest

    task = {"name": "arithmetic", "num_train": 6, "num_test": 4}
    first = make_routing(task=task, device=TINY_DEVICE, max_new_tokens=3, features="ngrams").unwrapped
    first.precompute()
    completions = [first.device_completion(i) for i in range(10)]
    core = first._core
    key = device_answers_key(core.device_config, core.task, 3, core.config.marker_match)
    legacy = tmp_path / "old" / f"device-answers-{digest(key)}.json"
    legacy.parent.mkdir()
    legacy.write_text(json.dumps({"key": key, "completions": completions}))
    monkeypatch.setattr(routing, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    old = make_routing(
        task=task, device=TINY_DEVICE, max_new_tokens=3, features="ngrams", cache_dir=str(legacy.parent)
    )
    assert [old.unwrapped.device_completion(i) for i in range(10)] == completions
