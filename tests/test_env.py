"""DeviceCloud-v0: registration, checkers, rewards per outcome, stop rules and score()."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from conftest import encode, play
from gymnasium.utils.env_checker import check_env

from collab_env import HELP_MARKER, ConfigError, IllegalActionError


def test_make_with_and_without_import(make_env, cloud_cache):
    env = make_env()
    assert env.unwrapped.help_action == len(env.unwrapped.tokenizer)
    other = gym.make("collab_env:DeviceCloud-v0", cloud={"name": "simulated", "cache_path": cloud_cache})
    assert other.unwrapped.action_space == env.unwrapped.action_space


def test_default_make_uses_embedded_defaults():
    env = gym.make("DeviceCloud-v0", cloud={"name": "simulated", "cache_path": ":memory:"})
    obs, info = env.reset(seed=0)
    assert env.unwrapped.task.name == "arithmetic"
    assert env.observation_space.contains(obs)
    assert obs["budget"][0] == pytest.approx(0.3)  # rho = 3/7 -> 30% of questions
    assert (
        env.unwrapped.tokenizer.decode(obs["input_ids"][: obs["attention_mask"].sum()]).count("Calculate")
        == 1
    )


def test_gymnasium_and_sb3_env_checkers_pass(make_env):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = make_env()
    check_env(env.unwrapped)
    sb3_check_env(env.unwrapped)


def _problem(env, options=None):
    _, info = env.reset(seed=1, options=options)
    return env.unwrapped.task.problem(info["prompt_id"])


def test_reward_local_correct(make_env):
    env = make_env()
    problem = _problem(env)
    reward, terminated, truncated, info = play(
        env, encode(env, f"<think>easy</think><answer>{problem.answer}</answer>")
    )
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info["outcome"] == "local_correct" and info["correct"] and not info["called_cloud"]
    assert info["stop_reason"] == "answer" and info["cloud_correct"] is None


def test_reward_wrong_local_answer(make_env):
    env = make_env()
    problem = _problem(env)
    reward, _, _, info = play(env, encode(env, f"<answer>{int(problem.answer) + 1}</answer>"))
    assert reward == 0.0 and info["outcome"] == "wrong" and not info["correct"]


def test_reward_help_with_cloud_right_and_wrong(make_env):
    right = make_env(cloud={"accuracy": 1.0})
    _problem(right)
    _, reward, terminated, _, info = right.step(right.unwrapped.help_action)
    assert terminated and reward == pytest.approx(0.3)
    assert info["outcome"] == "cloud_correct" and info["cloud_correct"] and info["called_cloud"]

    wrong = make_env(cloud={"accuracy": 0.0, "seed": 5, "cache_path": ":memory:"})
    _problem(wrong)
    _, reward, _, _, info = wrong.step(wrong.unwrapped.help_action)
    assert reward == 0.0 and info["outcome"] == "wrong" and info["cloud_correct"] is False


def test_over_budget_in_cap_mode_is_scored_on_the_local_answer(make_env):
    env = make_env(budget={"mode": "cap", "ratio": 3 / 7}, cloud={"accuracy": 1.0})
    _problem(env)
    _, reward, _, _, info = env.step(env.unwrapped.help_action)  # first episode: 1 call > 0.3 * 1
    assert info["outcome"] == "over_budget" and info["budget"]["over_budget"]
    assert reward == 0.0 and not info["called_cloud"] and info["called_help"]


def test_v1_format_reward_and_penalty_mode(make_env):
    env = make_env(reward={"version": "v1", "alpha_a": 2.0, "alpha_c": 0.5, "alpha_f": 0.2})
    problem = _problem(env)
    reward, *_ = play(env, encode(env, f"<think>sum</think><answer>{problem.answer}</answer>"))
    assert reward == pytest.approx(2.2)
    problem = _problem(env)
    reward, *_ = play(env, encode(env, f"<answer>{problem.answer}</answer>"))
    assert reward == pytest.approx(2.0)

    penalised = make_env(budget={"mode": "penalty", "penalty": 0.1}, cloud={"accuracy": 1.0})
    _problem(penalised)
    _, reward, *_ = penalised.step(penalised.unwrapped.help_action)
    assert reward == pytest.approx(0.3 - 0.1)


def test_marker_written_token_by_token_equals_help_action(make_env):
    env = make_env(cloud={"accuracy": 1.0})
    _problem(env)
    obs_a, reward_a, term_a, trunc_a, info_a = env.step(env.unwrapped.help_action)
    _problem(env)
    tokens = encode(env, "<think>hard</think> " + HELP_MARKER)
    for token in tokens:
        obs_b, reward_b, term_b, trunc_b, info_b = env.step(token)
        if term_b:
            break
    assert (reward_a, term_a, trunc_a) == (reward_b, term_b, trunc_b)
    for key in ("called_help", "called_cloud", "outcome", "cloud_answer", "prompt_id"):
        assert info_a[key] == info_b[key]
    assert info_b["stop_reason"] == "help"


def test_lenient_marker_catches_misspelling_and_strict_does_not(make_env):
    text = "<unknown> I need external assitance</unknown>"
    lenient = make_env(cloud={"accuracy": 1.0})
    _problem(lenient)
    _, _, _, info = play(lenient, encode(lenient, text))
    assert info["called_help"] and info["stop_reason"] == "help"
    strict = make_env(marker_match="strict", max_new_tokens=len(encode(lenient, text)))
    _problem(strict)
    _, _, truncated, info = play(strict, encode(strict, text))
    assert truncated and not info["called_help"]


def test_truncation_at_max_new_tokens(make_env):
    env = make_env(max_new_tokens=5)
    _problem(env)
    token = encode(env, " 7")[-1]
    for step in range(5):
        _, reward, terminated, truncated, info = env.step(token)
        assert terminated is False
        assert truncated is (step == 4)
    assert info["stop_reason"] == "length" and info["completion_tokens"] == 5 and reward == 0.0


def test_eos_terminates(make_env):
    env = make_env()
    _problem(env)
    _, _, terminated, truncated, info = env.step(env.unwrapped.tokenizer.eos_token_id)
    assert terminated and not truncated and info["stop_reason"] == "eos"


@pytest.mark.parametrize(
    "text", ["<answer>{answer}</answer> tail", "<think>x</think>" + HELP_MARKER, "no answer at all"]
)
def test_score_equals_stepping(make_env, text):
    stepped, scored = make_env(max_new_tokens=20), make_env(max_new_tokens=20)
    problem = _problem(stepped)
    tokens = encode(stepped, text.format(answer=problem.answer)) + [encode(stepped, " x")[-1]] * 20
    step_reward, _, _, step_info = play(stepped, tokens)
    _problem(scored)
    score_reward, score_info = scored.unwrapped.score(problem.id, tokens)
    assert score_reward == step_reward
    assert score_info == step_info


def test_illegal_actions_raise_clear_errors(make_env):
    env = make_env()
    env.reset(seed=0)
    size = env.unwrapped.action_space.n
    for bad in (-1, size, 2.5, "a", None):
        with pytest.raises(IllegalActionError, match="outside the action space"):
            env.unwrapped.step(bad)
    env.unwrapped.step(env.unwrapped.help_action)
    with pytest.raises(IllegalActionError, match="call reset"):
        env.unwrapped.step(0)


def test_reset_options(make_env):
    env = make_env()
    test_ids = {p.id for p in env.unwrapped.task.problems("test")}
    _, info = env.reset(seed=0, options={"split": "test"})
    assert info["prompt_id"] in test_ids
    _, info = env.reset(options={"prompt_id": 7})
    assert info["prompt_id"] == 7
    with pytest.raises(ConfigError, match="unknown reset option"):
        env.reset(options={"promptid": 7})
    with pytest.raises(ConfigError, match="does not exist"):
        env.reset(options={"prompt_id": 10_000})


def test_seeded_reruns_give_identical_trajectories(make_env):
    def rollout(env):
        obs, info = env.reset(seed=3)
        rng = np.random.default_rng(0)
        out = [info]
        for _ in range(30):
            obs, reward, terminated, truncated, info = env.step(int(rng.integers(env.action_space.n)))
            out.append((obs["input_ids"].tolist(), reward, info))
            if terminated or truncated:
                obs, info = env.reset()
                out.append(info)
        return out

    assert rollout(make_env(max_new_tokens=4)) == rollout(make_env(max_new_tokens=4))


def test_render_ansi(make_env):
    env = make_env(render_mode="ansi")
    problem = _problem(env)
    play(env, encode(env, f"<answer>{problem.answer}</answer>"))
    text = env.render()
    assert problem.question in text and "[local_correct]" in text


def test_prompt_too_long_names_the_setting(make_env):
    from collab_env import PromptTooLongError

    env = make_env(max_prompt_tokens=20)
    with pytest.raises(PromptTooLongError, match="max_prompt_tokens"):
        env.reset(seed=0)


def test_creating_the_env_loads_no_model_weights(monkeypatch, cloud_cache):
    import collab_env.models

    def refuse(*args, **kwargs):
        raise AssertionError("gym.make must not load model weights")

    monkeypatch.setattr(collab_env.models, "load_model", refuse)
    monkeypatch.setattr(collab_env.models, "smollm2_model_dir", refuse)
    env = gym.make("DeviceCloud-v0", cloud={"name": "simulated", "cache_path": cloud_cache})
    obs, _ = env.reset(seed=0)
    assert obs["attention_mask"].sum() > 0


@pytest.mark.parametrize(
    "bad", [-1, -2, "past the help action", 2.5, float("nan"), None], ids=lambda b: repr(b)
)
def test_score_refuses_the_token_ids_step_refuses(make_env, bad):
    """score() and score_many() take exactly the actions step() takes: a negative id used to index
    the token table from its end, a float was truncated to another token."""
    env = make_env()
    core = env.unwrapped
    bad = core.help_action + 1 if bad == "past the help action" else bad
    problem = _problem(env)
    with pytest.raises(IllegalActionError, match="outside the action space") as stepped:
        core.step(bad)
    valid = f"Discrete({core.help_action + 1}): use a token id in [0, {core.help_action - 1}] or {core.help_action}"
    assert valid in str(stepped.value)
    tokens = [*encode(env, "<think>"), bad, *encode(env, f"<answer>{problem.answer}</answer>")]
    for call in (
        lambda: core.score(problem.id, tokens),
        lambda: core.score_many([problem.id, problem.id], [encode(env, "<answer>1</answer>"), tokens]),
    ):
        with pytest.raises(IllegalActionError) as scored:
            call()
        position = len(encode(env, "<think>"))
        assert str(scored.value) == str(stepped.value).replace(
            " is outside", f" (token {position} of the completion) is outside"
        )
    assert (core.budget.episodes, core.cloud.stats.calls) == (0, 0)  # a refused completion counts nothing
    # The help action is a valid token in score as in step, and odd integer types are taken by both.
    reward, info = core.score(problem.id, [np.int64(encode(env, " 7")[-1]), 7.0, core.help_action])
    assert info["called_help"] and info["stop_reason"] == "help" and core.budget.episodes == 1
    # A token after the first stop is never read, as step() never sees it.
    _, info = core.score(problem.id, [*encode(env, f"<answer>{problem.answer}</answer>"), bad])
    assert info["local_correct"] and info["stop_reason"] == "answer"


def test_vector_env_score_refuses_a_negative_token(cloud_cache):
    vec = gym.make_vec(
        "DeviceCloud-v0",
        num_envs=2,
        vectorization_mode="vector_entry_point",
        task={"name": "arithmetic", "num_train": 10, "num_test": 5},
        cloud={"name": "simulated", "cache_path": cloud_cache},
    )
    with pytest.raises(IllegalActionError, match=r"action -1 \(token 0 of the completion\) is outside"):
        vec.unwrapped.score(0, [-1])
    assert vec.unwrapped.score(0, [vec.unwrapped.help_action], env_index=1)[1]["called_help"]


ANSWER_THEN_HELP = {
    "answer_tags": "<think>{a} is the sum</think>",
    "plain": "<think>{a} is the sum</think>",
    "numbered_steps": "Step 1: the sum is {a}. \\boxed{{{a}}}",
}


@pytest.mark.parametrize("template", ["answer_tags", "numbered_steps", "plain"])
@pytest.mark.parametrize("how", ["help_action", "marker", "untagged"])
def test_a_completion_that_calls_for_help_is_never_locally_correct(make_env, template, how):
    """Calling for help gives up the local answer under every template (scoring.py): under
    numbered_steps, which has no answer stop, a \\boxed answer before the marker used to count as
    locally correct, and a refused call then earned alpha_a and a place in GAPG's Set 1. Under
    answer_tags and plain, `</answer>` ends the completion first, so no call can follow an answer.
    plain's prompt offers no help, yet a call there is a call: the cloud answers, or the cap refuses."""
    task = {"name": "arithmetic", "num_train": 20, "num_test": 10, "template": template}
    env = make_env(task=task, budget={"mode": "cap", "ratio": 3 / 7}, cloud={"accuracy": 1.0})
    core = env.unwrapped
    problem = _problem(env)
    before = encode(env, ANSWER_THEN_HELP[template].format(a=problem.answer))
    call = {
        "help_action": [core.help_action],
        "marker": encode(env, " " + HELP_MARKER),
        "untagged": encode(env, " I need external assistance"),
    }[how]
    # The answer in the template's own format is locally correct when no help is called ...
    _, info = core.score(problem.id, encode(env, core.task.template.render_answer(problem.answer)))
    assert info["local_correct"] and info["outcome"] == "local_correct" and not info["called_help"]
    # ... and the same reasoning followed by a call is not, whether the cloud is asked or refused.
    for budget, outcome, reward in (("cap", "over_budget", 0.0), ("train", "cloud_correct", 0.3)):
        env = make_env(
            task=task,
            max_new_tokens=len(before) + len(call),
            budget={"mode": budget, "ratio": 3 / 7},
            cloud={"accuracy": 1.0},
        )
        assert _problem(env).id == problem.id
        got_reward, _, _, info = play(env, before + call)
        assert info["called_help"] and not info["local_correct"], info
        assert info["outcome"] == outcome and got_reward == pytest.approx(reward)
        scored = make_env(task=task, max_new_tokens=len(before) + len(call), budget={"mode": budget})
        assert scored.unwrapped.score(problem.id, before + call)[1]["local_correct"] is False
    if template == "numbered_steps":  # the answer is there, and still reported, but not credited
        assert info["local_answer"] == problem.answer
    else:  # the answer stop comes first: what follows it is never read, so nothing is called
        answered = encode(env, core.task.template.render_answer(problem.answer)) + call
        _, info = make_env(task=task, budget={"mode": "train"}).unwrapped.score(problem.id, answered)
        assert info["stop_reason"] == "answer" and info["local_correct"] and not info["called_help"]
