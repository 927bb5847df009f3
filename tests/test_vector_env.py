"""The numpy vector form equals N single environments and fixes prompts per sub-env."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from conftest import SMALL_TASK

from collab_env import ConfigError


def _vector(cloud_cache, n, **kwargs):
    return gym.make_vec(
        "DeviceCloud-v0",
        num_envs=n,
        vectorization_mode="vector_entry_point",
        task=SMALL_TASK,
        cloud={"name": "simulated", "cache_path": cloud_cache},
        **kwargs,
    )


def test_vector_env_equals_n_single_envs(make_env, cloud_cache):
    n, steps = 3, 25
    vec = _vector(cloud_cache, n, max_new_tokens=4)
    singles = [make_env(max_new_tokens=4) for _ in range(n)]
    assert vec.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    v_obs, v_info = vec.reset(seed=10)
    s_resets = [env.reset(seed=10 + i) for i, env in enumerate(singles)]
    for i, (obs, info) in enumerate(s_resets):
        np.testing.assert_array_equal(v_obs["input_ids"][i], obs["input_ids"])
        assert v_info["prompt_id"][i] == info["prompt_id"]
    rng = np.random.default_rng(0)
    vocab = singles[0].unwrapped.help_action + 1
    pending_reset = [False] * n
    episodes_ended = 0
    for _ in range(steps):
        actions = rng.integers(vocab, size=n)
        v_obs, v_rew, v_term, v_trunc, v_info = vec.step(actions)
        for i, env in enumerate(singles):
            if pending_reset[i]:
                obs, info = env.reset()
                reward, terminated, truncated = 0.0, False, False
                assert v_info["prompt_id"][i] == info["prompt_id"]
            else:
                obs, reward, terminated, truncated, info = env.step(int(actions[i]))
                if terminated or truncated:
                    assert v_info["outcome"][i] == info["outcome"]
                    assert v_info["budget"]["calls"][i] == info["budget"]["calls"]
            pending_reset[i] = terminated or truncated
            episodes_ended += pending_reset[i]
            np.testing.assert_array_equal(v_obs["input_ids"][i], obs["input_ids"])
            np.testing.assert_array_equal(v_obs["budget"][i], obs["budget"])
            assert (v_rew[i], v_term[i], v_trunc[i]) == (reward, terminated, truncated)
    assert episodes_ended >= n  # the comparison covered autoresets


def test_prompt_ids_option_fixes_a_group(cloud_cache):
    vec = _vector(cloud_cache, 4)
    _, info = vec.reset(seed=0, options={"prompt_ids": [5, 5, 5, 5]})
    assert list(info["prompt_id"]) == [5, 5, 5, 5]
    with pytest.raises(ConfigError, match="prompt_ids"):
        vec.reset(options={"prompt_ids": [1, 2]})


def test_vector_score_matches_single_score(make_env, cloud_cache):
    vec = _vector(cloud_cache, 2)
    single = make_env()
    problem = single.unwrapped.task.problem(3)
    tokens = single.unwrapped.tokenizer.encode(f"<answer>{problem.answer}</answer>", add_special_tokens=False)
    assert vec.unwrapped.score(3, tokens, env_index=1) == single.unwrapped.score(3, tokens)
