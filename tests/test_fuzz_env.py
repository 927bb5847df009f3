"""Property-based fuzzing of DeviceCloud-v0, its vector form and DeviceCloudRouting-v0.

Hypothesis draws environment settings (budget mode, ratio, window, penalty, episode length, marker
matching, cloud accuracy) and sequences of resets (random, invalid or numpy seeds; valid and invalid
option keys and values) and actions (random tokens, EOS, help, whole answers or markers written
token by token, and illegal values). Each sequence runs against a reference model of the env:

- only a wrong argument raises, and then only the library's errors (IllegalActionError for an
  action, ConfigError for a seed or an option); every legal call succeeds;
- every observation is inside the observation space and shows exactly the prompt, then the
  completion so far (checked against the env's own stop rules), then padding;
- the budget counts add up with the infos, reset as documented (a seeded reset, reset_budget=True,
  a full window), never let cloud calls exceed episodes or, in `cap` mode, the cap, and a call is
  refused only when admitting it would break the cap;
- rewards follow from the infos, the cloud is asked at most once per prompt;
- the same sequence on a fresh env gives the same trajectory and infos, and a call that raised
  changed nothing: replaying only the calls that succeeded gives the same trajectory.

Examples are derandomized by default (the same cases every run, so the suite stays reproducible);
DEVICECLOUD_FUZZ_RANDOM=1 draws new ones and DEVICECLOUD_FUZZ_SCALE=<k> runs k times as many. Each
test records its counts (cases, calls, episodes, errors raised as required) as junit properties.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import collab_env  # noqa: F401  (registers the environments)
from collab_env.config import BUDGET_MODES
from collab_env.errors import ConfigError, IllegalActionError
from collab_env.routing_env import CLOUD_ACTION, scripted_device
from collab_env.tasks import HELP_MARKER

TASK = {"name": "arithmetic", "num_train": 40, "num_test": 20}
N_PROMPTS = 60
SCALE = int(os.environ.get("DEVICECLOUD_FUZZ_SCALE", "1"))
FUZZ = settings(
    deadline=None,
    database=None,  # nothing written next to the repository
    derandomize=os.environ.get("DEVICECLOUD_FUZZ_RANDOM") != "1",
    print_blob=True,
)
ALPHA_A, ALPHA_C = 1.0, 0.3  # the default RewardConfig
TOLERANCE = 1e-9


# ---------------------------------------------------------------------------------------------
# Strategies


class Over:
    """Stands for help_action + 1, the first value past the action space (known once an env exists)."""

    def __repr__(self) -> str:
        return "Over()"


ILLEGAL_ACTIONS = [
    -1,
    Over(),
    10**30,
    2.5,
    float("nan"),
    float("inf"),
    -math.inf,
    "7",
    None,
    [1],
    np.array([2]),
    1 + 0j,
    b"1",
]
ODD_LEGAL_ACTIONS = [np.int64(17), 7.0, np.float32(3.0), Fraction(11, 1), np.uint8(9), True]
TEXTS = ("right", "wrong", "marker", "untagged", "think")

env_settings = st.fixed_dictionaries(
    {
        "budget": st.fixed_dictionaries(
            {
                "mode": st.sampled_from(BUDGET_MODES),
                "ratio": st.sampled_from([0.0, 0.1, 3 / 7, 0.5, 1.0]) | st.floats(0.0, 1.0),
                "window": st.none() | st.integers(1, 6),
                "penalty": st.sampled_from([0.0, 0.1, 0.3]),
            }
        ),
        "max_new_tokens": st.integers(2, 14),
        "marker_match": st.sampled_from(["strict", "lenient"]),
        "accuracy": st.sampled_from([0.0, 0.5, 1.0]),
    }
)
seeds = st.none() | st.integers(0, 2**32 - 1) | st.sampled_from([-1, 2.5, "7", True, np.int64(5), [3]])
prompt_ids = st.integers(0, N_PROMPTS - 1) | st.sampled_from(
    [-1, N_PROMPTS, 10**9, 2.5, "3", None, True, np.int64(2), np.float64(1.0)]
)
splits = st.sampled_from(["train", "test", "TRAIN", "", 1, None])
reset_budgets = st.sampled_from([True, False, np.bool_(True), "yes", 1, None])
valid_options = st.fixed_dictionaries(
    {},
    optional={
        "prompt_id": st.integers(0, N_PROMPTS - 1),
        "split": st.sampled_from(["train", "test"]),
        "reset_budget": st.booleans(),
    },
)
any_options = st.fixed_dictionaries(
    {},
    optional={
        "prompt_id": prompt_ids,
        "split": splits,
        "reset_budget": reset_budgets,
        "promptid": st.just(3),
    },
) | st.sampled_from(["split", [("split", "test")], 3])
single_options = st.none() | valid_options | any_options
token_actions = (
    st.tuples(st.just("token"), st.integers(0, 10**6))
    | st.just(("help",))
    | st.just(("eos",))
    | st.tuples(st.just("text"), st.sampled_from(TEXTS))
    | st.tuples(st.just("raw"), st.sampled_from(ILLEGAL_ACTIONS + ODD_LEGAL_ACTIONS))
)


def with_early_steps(
    steps: st.SearchStrategy[tuple[Any, ...]], episodes: st.SearchStrategy[list[tuple[Any, ...]]]
) -> st.SearchStrategy[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    """(steps taken before the first reset, the rest): the tests put their seeded first reset between."""
    return st.tuples(st.lists(steps, max_size=2), episodes)


# Episodes of a reset and a few steps (steps past an episode's end included), flattened into one list.
single_ops = st.lists(
    st.tuples(
        st.tuples(st.just("reset"), seeds, single_options),
        st.lists(st.tuples(st.just("step"), token_actions), max_size=8),
    ),
    min_size=1,
    max_size=8,
).map(lambda episodes: [op for reset, steps in episodes for op in (reset, *steps)])
single_ops = with_early_steps(st.tuples(st.just("step"), token_actions), single_ops)


# ---------------------------------------------------------------------------------------------
# The reference model


def seed_ok(seed: Any) -> bool:
    return seed is None or (isinstance(seed, int | np.integer) and not isinstance(seed, bool) and seed >= 0)


def prompt_id_ok(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and 0 <= value < N_PROMPTS


def options_ok(options: Any, allowed: tuple[str, ...], num_envs: int = 1) -> bool:
    if options is None:
        return True
    if not isinstance(options, dict) or set(options) - set(allowed):
        return False
    if "split" in options and options["split"] not in ("train", "test"):
        return False
    if "reset_budget" in options and not isinstance(options["reset_budget"], bool | np.bool_):
        return False
    if "prompt_id" in options and not prompt_id_ok(options["prompt_id"]):
        return False
    ids = options.get("prompt_ids", [0] * num_envs)
    return isinstance(ids, list) and len(ids) == num_envs and all(map(prompt_id_ok, ids))


def action_ok(action: Any, size: int) -> bool:
    """The documented rule: an integer-valued scalar in [0, size)."""
    if isinstance(action, list | np.ndarray | bytes | str | complex) or action is None:
        return False
    try:
        return float(action).is_integer() and 0 <= action < size
    except (TypeError, ValueError, OverflowError):
        return False


class BudgetModel:
    """What `CloudBudget` should count, written from the paper's constraint rather than budget.py's code.

    The constraint is E[cloud calls] <= rho * E[local answers] (v3 eq. 1): here, counted over the
    window's episodes, a call is admitted when the window's cloud calls, this one included, stay within
    rho times its local answers, this episode excluded. With a window of N episodes the quota is the
    largest k with k <= rho * (N - k), first come first served, and a full window starts afresh.
    (budget.py writes the same rule as a share rho/(1+rho) of the episodes.)"""

    def __init__(self, budget: dict[str, Any]) -> None:
        self.mode, self.window, self.penalty = budget["mode"], budget["window"], budget["penalty"]
        self.rho = budget["ratio"]
        self.calls = self.episodes = 0

    def reset(self) -> None:
        self.calls = self.episodes = 0

    def within(self, calls: int, local: int) -> bool:
        return calls <= self.rho * local + TOLERANCE

    def quota(self) -> int:
        """Calls a window of `window` episodes may make."""
        return max(k for k in range(self.window + 1) if self.within(k, self.window - k))

    def admits(self) -> bool:
        """Whether one more call would be admitted now (cap mode), counting a full window as fresh."""
        if self.mode != "cap":
            return True
        if self.window is None:  # after the call: calls + 1 cloud answers, episodes - calls local ones
            return self.within(self.calls + 1, self.episodes - self.calls)
        calls = 0 if self.episodes >= self.window else self.calls
        return calls + 1 <= self.quota()

    def finish(self, info: dict[str, Any], reward: float, obs_budget: np.ndarray) -> None:
        """Check one finished episode's info, reward and budget observation, and count it."""
        admitted = self.admits()
        if self.window is not None and self.episodes >= self.window:
            self.reset()
        called, used = info["called_help"], info["called_cloud"]
        assert used == (called and admitted), (info, self.calls, self.episodes)
        self.episodes += 1
        self.calls += int(used)
        assert info["budget"] == {
            "calls": self.calls,
            "episodes": self.episodes,
            "ratio": self.calls / self.episodes,
            "over_budget": called and not used,
        }
        assert self.calls <= self.episodes
        if self.mode == "cap" and self.window is None:
            assert self.within(self.calls, self.episodes - self.calls)
        elif self.mode == "cap":
            assert self.calls <= self.quota()
        assert info["outcome"] == (
            "over_budget"
            if called and not used
            else ("cloud_correct" if info["cloud_correct"] else "wrong")
            if used
            else ("local_correct" if info["local_correct"] else "wrong")
        )
        assert info["correct"] == (bool(info["cloud_correct"]) if used else info["local_correct"])
        expected = (
            (ALPHA_C if info["cloud_correct"] else 0.0)
            if used
            else (ALPHA_A if info["local_correct"] else 0.0)
        )
        if used and self.mode == "penalty":
            expected -= self.penalty
        assert reward == pytest.approx(expected)
        share = self.rho / (1 + self.rho)  # the observation's documented target share
        np.testing.assert_allclose(obs_budget, [share, self.calls / self.episodes], rtol=1e-6, atol=1e-7)


# The oracle of stops, answers and grades: written from the env's documentation (DeviceCloud-v0's
# "Episode End", the answer_tags template, the numeric verifier), using none of markers.py, the
# task's extractor or its verifier.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>")
TAGGED_CALL = re.compile(
    r"<\s*unknown\s*>\s*i\s+need\s+external\s+assistance\s*<\s*/\s*unknown\s*>", re.IGNORECASE
)
UNTAGGED_CALL = re.compile(r"i\s+need\s+external\s+assistance\W*$", re.IGNORECASE)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@functools.cache
def token_tables(tokenizer: Any) -> tuple[frozenset[int], list[int], list[int]]:
    """The end-of-text ids, and the marker's tokens alone and after a space (once per tokenizer)."""
    vocab = tokenizer.get_vocab()
    end_ids = frozenset({vocab[t] for t in END_TOKENS if t in vocab} | {tokenizer.eos_token_id})
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    return end_ids, encode(HELP_MARKER), encode(" " + HELP_MARKER)


class ReferenceCompletion:
    """One completion as the documentation says it ends: EOS (not written), the help action (writes
    the marker), the marker's tokens as the tokenizer writes it (alone or after a space), with
    lenient matching its text with any spacing or case, or `</answer>`."""

    def __init__(self, tokenizer: Any, lenient: bool) -> None:
        self.tokenizer, self.lenient = tokenizer, lenient
        self.end_ids, self.marker, self.spaced_marker = token_tables(tokenizer)
        self.ids: list[int] = []
        self.called_help = False

    def step(self, token: int, help_action: int) -> str | None:
        if token == help_action:
            self.ids += self.marker
            self.called_help = True
            return "help"
        if token in self.end_ids:
            return "eos"
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if any(self.ids[-len(m) :] == m for m in (self.marker, self.spaced_marker)) or (
            self.lenient and TAGGED_CALL.search(text)
        ):
            self.called_help = True
            return "help"
        return "answer" if "</answer>" in text else None

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def calls_help(self) -> bool:
        """At the end: the marker, or (lenient) a completion ending in the untagged words."""
        return self.called_help or (self.lenient and bool(UNTAGGED_CALL.search(self.text().strip())))

    def answer(self) -> str | None:
        found = ANSWER.findall(self.text())
        return found[-1].strip() if found else None


def arithmetic_truth(problem: Any) -> int:
    a, op, b = problem.data["a"], problem.data["op"], problem.data["b"]
    return a + b if op == "+" else a * b


def graded_right(answer: str | None, truth: int) -> bool:
    """The numeric verifier's documented rule for the answers the fuzzer writes: the same number."""
    cleaned = (answer or "").strip().replace(",", "")
    return bool(re.fullmatch(r"[-+]?\d+(\.0*)?", cleaned)) and Fraction(cleaned) == truth


def check_grades(
    info: dict[str, Any],
    completion: ReferenceCompletion,
    problem: Any,
    accuracy: float,
    batched: bool = False,
) -> None:
    """The final info's call, answers and grades against the oracle (a call gives up the local answer).

    `batched`: the info was read out of the vector env's batched info, where gymnasium's `_add_info`
    keeps `cloud_correct` in a bool array when another sub-env's is a bool, so its None reads False."""
    truth = arithmetic_truth(problem)
    assert info["called_help"] == completion.calls_help(), (info, completion.text())
    assert info["local_answer"] == completion.answer(), (info, completion.text())
    assert info["local_correct"] == (not info["called_help"] and graded_right(info["local_answer"], truth))
    if info["called_cloud"]:
        assert info["cloud_correct"] == graded_right(info["cloud_answer"], truth)
        if accuracy in (0.0, 1.0):
            assert info["cloud_correct"] == (accuracy == 1.0)
    else:
        assert (
            info["cloud_correct"] in ((None, False) if batched else (None,)) and info["cloud_answer"] is None
        )


GRADE_COUNTS = ("stop_eos", "stop_help", "stop_answer", "stop_length", "local_right", "cloud_right")
"""Cases each run meets many times over (untagged calls and wrong local answers are counted, but rarer)."""


def count_grades(counts: Counter[str], info: dict[str, Any]) -> None:
    """Count how an episode ended and how it was graded, so a test can show that its oracle met each case."""
    counts[f"stop_{info['stop_reason']}"] += 1
    counts["untagged_calls"] += info["called_help"] and info["stop_reason"] != "help"
    if info["local_answer"] is not None:
        counts["local_right" if info["local_correct"] else "local_wrong"] += 1
    counts["cloud_right"] += bool(info["cloud_correct"])


def freeze(value: Any) -> Any:
    """A comparable copy: arrays as lists, numpy scalars as Python ones."""
    if isinstance(value, dict):
        return {k: freeze(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [freeze(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def text_tokens(env: Any, which: str, answer: str) -> list[int]:
    encode = env.tokenizer.encode
    if which == "almost":  # the marker's tokens with another last token: no call, in either mode
        return encode(f" {HELP_MARKER}", add_special_tokens=False)[:-1] + encode(
            " ok", add_special_tokens=False
        )
    text = {
        "right": f"<answer>{answer}</answer>",
        "wrong": f"<answer>{int(answer) + 1}</answer>",
        "marker": f" {HELP_MARKER}",  # 10 tokens: it fits an episode (a "think" text may come first)
        "untagged": " I need external assistance",
        "think": "<think>carry the one</think>",
    }[which]
    return encode(text, add_special_tokens=False)


def check_obs(env: Any, obs: dict[str, np.ndarray], prompt: np.ndarray, completion: list[int]) -> None:
    """In the space, and exactly [prompt | completion | padding] with the mask on the first two."""
    assert env.observation_space.contains(obs), freeze(obs)
    used = len(prompt) + len(completion)
    np.testing.assert_array_equal(
        obs["input_ids"][:used], np.concatenate([prompt, completion]).astype(np.int64)
    )
    assert (obs["input_ids"][used:] == env.tokenizer.pad_token_id).all()
    assert obs["attention_mask"][:used].all() and not obs["attention_mask"][used:].any()


# ---------------------------------------------------------------------------------------------
# DeviceCloud-v0


def make_single(config: dict[str, Any]) -> Any:
    return gym.make(
        "DeviceCloud-v0",
        task=TASK,
        cloud={"name": "simulated", "cache_path": ":memory:", "accuracy": config["accuracy"]},
        budget=config["budget"],
        max_new_tokens=config["max_new_tokens"],
        marker_match=config["marker_match"],
    ).unwrapped


def concrete_actions(env: Any, op: tuple[Any, ...], answer: str | None) -> Iterator[Any]:
    """The actions an abstract step op stands for; "text" ops need the current prompt's answer."""
    kind = op[0]
    if kind == "token":
        yield op[1] % env.help_action
    elif kind == "help":
        yield env.help_action
    elif kind == "eos":
        yield env.tokenizer.eos_token_id
    elif kind == "text":
        yield from text_tokens(env, op[1], answer or "0")
    elif isinstance(op[1], Over):
        yield env.help_action + 1
    else:
        yield op[1]


def checked_reset(
    env: Any,
    seed: Any,
    options: Any,
    budget: BudgetModel,
    counts: Counter[str],
    trajectory: list[Any],
    calls: list[tuple[Any, ...]],
) -> tuple[Any, dict[str, Any]] | None:
    """Reset a single or routing env: it must refuse exactly the bad seeds and options, with ConfigError.
    Records the call (and a refusal's error); a seed or reset_budget starts the model's budget window.
    Returns (obs, info), or None when refused."""
    ok = options_ok(options, ("prompt_id", "split", "reset_budget")) and seed_ok(seed)
    try:
        obs, info = env.reset(seed=seed, options=options)
    except ConfigError as err:
        assert not ok, (seed, options, err)
        counts["config_errors"] += 1
        trajectory.append(("error", str(err)))
        calls.append(("reset", seed, options, False))
        return None
    assert ok, (seed, options)
    counts["resets"] += 1
    calls.append(("reset", seed, options, True))
    if seed is not None or (options or {}).get("reset_budget"):
        budget.reset()
    return obs, info


def run_single(
    config: dict[str, Any], ops: list[tuple[Any, ...]], counts: Counter[str]
) -> tuple[list[Any], list[tuple[Any, ...]]]:
    """Run abstract ops against a fresh env and the model; returns the trajectory and the concrete calls
    (("reset", seed, options) or ("act", action)) with a flag for whether each succeeded."""
    env = make_single(config)
    budget = BudgetModel(config["budget"])
    trajectory: list[Any] = []
    calls: list[tuple[Any, ...]] = []
    state = prompt = problem = None
    active = False
    asked: set[int] = set()
    for op in ops:
        if op[0] == "reset":
            _, seed, options = op
            reset = checked_reset(env, seed, options, budget, counts, trajectory, calls)
            if reset is None:
                continue
            obs, info = reset
            problem = env.task.problem(info["prompt_id"])
            if options and "prompt_id" in options:
                assert problem.id == options["prompt_id"]
            elif options and "split" in options:
                assert problem.split == options["split"]
            assert info == {"prompt_id": problem.id, "level": problem.level}
            state = ReferenceCompletion(env.tokenizer, config["marker_match"] == "lenient")
            prompt, active = env.prompt_tokens(problem.id), True
            check_obs(env, obs, prompt, state.ids)
            trajectory.append(("reset", freeze(obs), info))
            continue
        for action in concrete_actions(env, op[1], problem.answer if problem else None):
            ok = active and action_ok(action, env.help_action + 1)
            try:
                obs, reward, terminated, truncated, info = env.step(action)
            except IllegalActionError as err:
                assert not ok, (action, err)
                counts["illegal_actions"] += 1
                trajectory.append(("error", str(err)))
                calls.append(("act", action, False))
                break
            assert ok, action
            counts["steps"] += 1
            calls.append(("act", action, True))
            stop = state.step(int(action), env.help_action)
            length = stop is None and len(state.ids) >= config["max_new_tokens"]
            assert (terminated, truncated) == (stop is not None, length)
            check_obs(env, obs, prompt, state.ids)
            counts[f"written_marker_{config['marker_match']}"] += (
                stop == "help" and int(action) != env.help_action
            )
            if not (terminated or truncated):
                assert (reward, info) == (0.0, {})
            else:
                active = False
                counts["episodes"] += 1
                assert info["prompt_id"] == problem.id and info["completion_tokens"] == len(state.ids)
                assert info["stop_reason"] == (stop or "length")
                check_grades(info, state, problem, config["accuracy"])
                if info["called_cloud"]:
                    asked.add(problem.id)
                counts["cloud_calls"] += info["called_cloud"]
                counts["refused_calls"] += info["budget"]["over_budget"]
                count_grades(counts, info)
                budget.finish(info, reward, obs["budget"])
                assert env.cloud.stats.calls == len(asked)  # never asked twice for a prompt
            trajectory.append(("step", freeze(obs), reward, terminated, truncated, freeze(info)))
    env.close()
    return trajectory, calls


def replay_successes(calls: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The abstract ops that replay only the calls that succeeded."""
    return [("reset", c[1], c[2]) if c[0] == "reset" else ("step", ("raw", c[1])) for c in calls if c[-1]]


def successes(trajectory: list[Any]) -> list[Any]:
    return [entry for entry in trajectory if entry[0] != "error"]


def fuzz(
    record_testsuite_property: Callable[[str, object], None],
    name: str,
    examples: int,
    check: Callable[[Counter[str]], Callable[..., None]],
    *strategies: st.SearchStrategy[Any],
) -> Counter[str]:
    """Run `check(counts)` on `examples` drawn cases; record and return the counts."""
    counts: Counter[str] = Counter()
    body = check(counts)

    @settings(FUZZ, max_examples=examples * SCALE)
    @given(st.tuples(*strategies))
    def run(args: tuple[Any, ...]) -> None:
        counts["cases"] += 1
        body(*args)

    run()
    for key, value in sorted(counts.items()):
        record_testsuite_property(f"{name}.{key}", value)
    print(f"[fuzz] {name}: {dict(sorted(counts.items()))}")
    assert counts["cases"] >= examples * SCALE
    return counts


def test_fuzz_single_env(record_testsuite_property):
    def check(counts: Counter[str]) -> Callable[..., None]:
        def body(config: dict[str, Any], first_seed: int, drawn: tuple[list[Any], list[Any]]) -> None:
            early, rest = drawn  # steps before any reset must be refused too
            ops = [*early, ("reset", first_seed, None), *rest]  # a seeded first reset makes reruns comparable
            trajectory, calls = run_single(config, ops, counts)
            again, _ = run_single(config, ops, Counter())
            assert again == trajectory, "the same seed and calls gave another trajectory"
            replayed, _ = run_single(config, replay_successes(calls), Counter())
            assert replayed == successes(trajectory), "a call that raised changed the env"

        return body

    counts = fuzz(
        record_testsuite_property, "single", 60, check, env_settings, st.integers(0, 2**32 - 1), single_ops
    )
    # The examples reached what they are meant to test: episodes, refusals and both kinds of error,
    # every way an episode ends, and local answers graded both ways.
    assert (
        min(counts["episodes"], counts["illegal_actions"], counts["config_errors"], counts["refused_calls"])
        > 0
    )
    assert min(counts[k] for k in GRADE_COUNTS) > 0, dict(counts)


@pytest.mark.parametrize("marker_match", ["strict", "lenient"])
def test_scripted_episodes_meet_every_stop_rule_under_the_oracle(marker_match):
    """The cases random draws reach rarely, through the same runner and oracle: the marker written token
    by token (it ends the episode on its last token, in both modes), the marker with another last token
    and a marker cut off by the length limit (no call), the untagged words at the length limit (a call
    only when lenient), right and wrong answers."""
    config = {
        "budget": {"mode": "cap", "ratio": 1.0, "window": None, "penalty": 0.0},
        "max_new_tokens": 14,  # the marker is 10 tokens; "think" (10) + the untagged words (4) fill 14
        "marker_match": marker_match,
        "accuracy": 1.0,
    }
    episodes = [
        [("text", "marker")],
        [("text", "almost"), ("text", "right")],
        [("text", "think"), ("text", "untagged")],
        [("text", "think"), ("text", "marker")],
        [("text", "right")],
        [("text", "wrong")],
        [("eos",)],
        [("help",)],
    ]
    ops = [
        op
        for i, steps in enumerate(episodes)
        for op in (("reset", None if i else 0, None), *(("step", s) for s in steps))
    ]
    counts: Counter[str] = Counter()
    trajectory, _ = run_single(config, ops, counts)
    assert counts["episodes"] == len(episodes)
    assert counts[f"written_marker_{marker_match}"] == 1 and counts["stop_help"] == 2
    assert counts["untagged_calls"] == (marker_match == "lenient")
    assert (counts["stop_answer"], counts["local_right"], counts["local_wrong"], counts["stop_eos"]) == (
        2,
        1,
        1,
        1,
    )
    assert counts["stop_length"] == 3
    assert trajectory == run_single(config, ops, Counter())[0]


# ---------------------------------------------------------------------------------------------
# The vector form


def vector_seeds(n: int) -> st.SearchStrategy[Any]:
    return seeds | st.lists(st.integers(0, 2**16), min_size=n, max_size=n) | st.just(list(range(n + 1)))


def vector_options(n: int) -> st.SearchStrategy[Any]:
    ids = st.lists(prompt_ids, min_size=n, max_size=n) | st.lists(
        st.integers(0, N_PROMPTS - 1), max_size=n + 1
    )
    return (
        st.none()
        | st.fixed_dictionaries(
            {},
            optional={
                "prompt_ids": ids | st.just(3),
                "split": splits,
                "reset_budget": reset_budgets,
                "prompt_id": st.just(1),
            },
        )
        | st.just("split")
    )


def vector_ops(n: int) -> st.SearchStrategy[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    batch = st.lists(token_actions, min_size=n, max_size=n).map(lambda a: ("batch", a))
    malformed = st.sampled_from([("shape", n + 1), ("shape", 0), ("ragged",), ("scalar",)])
    episodes = st.lists(
        st.tuples(
            st.tuples(st.just("reset"), vector_seeds(n), vector_options(n)),
            st.lists(st.tuples(st.just("step"), batch | batch | malformed), max_size=8),
        ),
        min_size=1,
        max_size=5,
    ).map(lambda episodes: [op for reset, steps in episodes for op in (reset, *steps)])
    return with_early_steps(st.tuples(st.just("step"), batch | malformed), episodes)


def malformed_batch(op: tuple[Any, ...], n: int) -> Any:
    """A batch of actions the vector env must refuse whatever its state: wrong shape, ragged or scalar."""
    if op[0] == "shape":
        return np.zeros(op[1], dtype=np.int64)
    if op[0] == "ragged":
        return [1, [2, 3]] + [0] * (n - 2)
    return 5


def sub_info(infos: dict[str, Any], i: int) -> dict[str, Any]:
    """Sub-env i's info out of the vector env's batched info dict."""
    return {
        key: sub_info(value, i) if isinstance(value, dict) else freeze(value[i])
        for key, value in infos.items()
        if not key.startswith("_") and infos[f"_{key}"][i]
    }


def run_vector(
    n: int, config: dict[str, Any], ops: list[tuple[Any, ...]], counts: Counter[str]
) -> tuple[list[Any], list[tuple[Any, ...]]]:
    vec = gym.make_vec(
        "DeviceCloud-v0",
        num_envs=n,
        vectorization_mode="vector_entry_point",
        task=TASK,
        cloud={"name": "simulated", "cache_path": ":memory:", "accuracy": config["accuracy"]},
        budget=config["budget"],
        max_new_tokens=config["max_new_tokens"],
        marker_match=config["marker_match"],
    ).unwrapped
    single = make_single(config)  # the tokenizer and task the sub-envs share
    lenient = config["marker_match"] == "lenient"
    budgets = [BudgetModel(config["budget"]) for _ in range(n)]
    states: list[Any] = [None] * n
    prompts: list[Any] = [None] * n
    problems: list[Any] = [None] * n
    pending = [False] * n
    trajectory: list[Any] = []
    calls: list[tuple[Any, ...]] = []
    for op in ops:
        if op[0] == "reset":
            _, seed, options = op
            seed_list = isinstance(seed, list)
            ok = options_ok(options, ("prompt_ids", "split", "reset_budget"), n) and (
                (seed_list and len(seed) == n and all(map(seed_ok, seed)))
                or (not seed_list and seed_ok(seed))
            )
            try:
                obs, infos = vec.reset(seed=seed, options=options)
            except ConfigError as err:
                assert not ok, (seed, options, err)
                counts["config_errors"] += 1
                trajectory.append(("error", str(err)))
                calls.append(("reset", seed, options, False))
                continue
            assert ok, (seed, options)
            counts["resets"] += 1
            calls.append(("reset", seed, options, True))
            for i in range(n):
                if seed is not None or (options or {}).get("reset_budget"):
                    budgets[i].reset()
                problems[i] = single.task.problem(infos["prompt_id"][i])
                if options and "prompt_ids" in options:
                    assert problems[i].id == options["prompt_ids"][i]
                states[i], prompts[i], pending[i] = (
                    ReferenceCompletion(single.tokenizer, lenient),
                    single.prompt_tokens(problems[i].id),
                    False,
                )
            trajectory.append(("reset", freeze(obs), freeze(infos)))
        else:
            kind = op[1][0]
            if kind in ("batch", "raw"):
                if kind == "raw":  # a replayed batch
                    actions = list(op[1][1])
                else:  # one step of each sub-env's op (the first token of a text)
                    actions = [
                        next(concrete_actions(single, a, problems[i].answer if problems[i] else None))
                        for i, a in enumerate(op[1][1])
                    ]
                ok = states[0] is not None and all(
                    pending[i] or action_ok(actions[i], single.help_action + 1) for i in range(n)
                )
                batch: Any = np.empty(n, dtype=object)
                for i, action in enumerate(actions):  # element by element: a list action stays one element
                    batch[i] = action
            else:
                ok = False
                batch = malformed_batch(op[1], n)
            try:
                obs, rewards, terminated, truncated, infos = vec.step(batch)
            except IllegalActionError as err:
                assert not ok, (op, err)
                counts["illegal_actions"] += 1
                trajectory.append(("error", str(err)))
                calls.append(("act", batch, False))
                continue
            assert ok, op
            counts["steps"] += 1
            calls.append(("act", batch, True))
            for i in range(n):
                info = sub_info(infos, i)
                if pending[i]:  # next-step autoreset: the action was ignored, a new episode began
                    assert (rewards[i], terminated[i], truncated[i]) == (0.0, False, False)
                    problems[i] = single.task.problem(info["prompt_id"])
                    assert info == {"prompt_id": problems[i].id, "level": problems[i].level}
                    states[i], prompts[i], pending[i] = (
                        ReferenceCompletion(single.tokenizer, lenient),
                        single.prompt_tokens(problems[i].id),
                        False,
                    )
                    continue
                stop = states[i].step(int(actions[i]), single.help_action)
                length = stop is None and len(states[i].ids) >= config["max_new_tokens"]
                assert (terminated[i], truncated[i]) == (stop is not None, length)
                if terminated[i] or truncated[i]:
                    counts["episodes"] += 1
                    counts["cloud_calls"] += info["called_cloud"]
                    counts["refused_calls"] += info["budget"]["over_budget"]
                    count_grades(counts, info)
                    assert info["prompt_id"] == problems[i].id and info["completion_tokens"] == len(
                        states[i].ids
                    )
                    assert info["stop_reason"] == (stop or "length")
                    check_grades(info, states[i], problems[i], config["accuracy"], batched=True)
                    budgets[i].finish(info, float(rewards[i]), obs["budget"][i])
                    pending[i] = True
                else:
                    assert rewards[i] == 0.0 and info == {}
            trajectory.append(
                ("step", freeze(obs), freeze(rewards), freeze(terminated), freeze(truncated), freeze(infos))
            )
        if states[0] is not None:
            assert vec.observation_space.contains(obs)
            for i in range(n):
                check_obs(single, {k: v[i] for k, v in obs.items()}, prompts[i], states[i].ids)
    vec.close()
    single.close()
    return trajectory, calls


def test_fuzz_vector_env(record_testsuite_property):
    def check(counts: Counter[str]) -> Callable[..., None]:
        def body(n: int, config: dict[str, Any], first_seed: int, data: st.DataObject) -> None:
            early, rest = data.draw(vector_ops(n))
            ops = [*early, ("reset", first_seed, None), *rest]
            trajectory, calls = run_vector(n, config, ops, counts)
            again, _ = run_vector(n, config, ops, Counter())
            assert again == trajectory, "the same seed and calls gave another trajectory"
            replay = [
                ("reset", c[1], c[2]) if c[0] == "reset" else ("step", ("raw", c[1])) for c in calls if c[-1]
            ]
            replayed, _ = run_vector(n, config, replay, Counter())
            assert replayed == successes(trajectory), "a call that raised changed the vector env"

        return body

    counts = fuzz(
        record_testsuite_property,
        "vector",
        30,
        check,
        st.integers(2, 3),
        env_settings,
        st.integers(0, 2**32 - 1),
        st.data(),
    )
    assert min(counts["episodes"], counts["illegal_actions"], counts["config_errors"]) > 0
    # One token of a text per batch step: answers are never completed here (the single env's fuzz has them).
    assert min(counts[k] for k in ("stop_eos", "stop_help", "stop_length", "cloud_right")) > 0


# ---------------------------------------------------------------------------------------------
# DeviceCloudRouting-v0

EASY_LEVELS = ("add2", "add2_carry", "mul21")
ROUTING_ILLEGAL = [2, -1, 0.5, "1", None, [1], np.array([1]), 10**30, float("nan"), float("inf"), b"0"]
ROUTING_LEGAL = [0, 1, 0, 1, np.int64(1), 1.0, True, np.uint8(0)]
routing_ops = st.lists(
    st.tuples(
        st.tuples(st.just("reset"), seeds, single_options),
        st.lists(st.tuples(st.just("step"), st.sampled_from(ROUTING_LEGAL + ROUTING_ILLEGAL)), max_size=3),
    ),
    min_size=1,
    max_size=12,
).map(lambda episodes: [op for reset, steps in episodes for op in (reset, *steps)])
routing_ops = with_early_steps(st.tuples(st.just("step"), st.sampled_from(ROUTING_LEGAL)), routing_ops)


def make_routing(config: dict[str, Any], cache_dir: str) -> Any:
    return gym.make(
        "DeviceCloudRouting-v0",
        task=TASK,
        features="ngrams",
        device_answers=scripted_device(EASY_LEVELS),
        cache_dir=cache_dir,
        cloud={"name": "simulated", "cache_path": ":memory:", "accuracy": config["accuracy"]},
        budget=config["budget"],
        marker_match=config["marker_match"],
    ).unwrapped


def run_routing(
    config: dict[str, Any], ops: list[tuple[Any, ...]], cache_dir: str, counts: Counter[str]
) -> tuple[list[Any], list[tuple[Any, ...]]]:
    """As `run_single`, for the routing env: one step per episode, on the device's cached answers."""
    env = make_routing(config, cache_dir)
    budget = BudgetModel(config["budget"])
    trajectory: list[Any] = []
    calls: list[tuple[Any, ...]] = []
    problem = None
    asked: set[int] = set()
    for op in ops:
        if op[0] == "reset":
            _, seed, options = op
            reset = checked_reset(env, seed, options, budget, counts, trajectory, calls)
            if reset is None:
                continue
            obs, info = reset
            problem = env.task.problem(info["prompt_id"])
            assert env.observation_space.contains(obs)
            if budget.episodes and not (budget.window is not None and budget.episodes >= budget.window):
                np.testing.assert_allclose(
                    obs[-2:], [budget.rho / (1 + budget.rho), budget.calls / budget.episodes], atol=1e-7
                )
            trajectory.append(("reset", freeze(obs), info))
            continue
        action = op[1]
        ok = problem is not None and action_ok(action, 2)
        masks = env.action_masks()
        try:
            obs, reward, terminated, truncated, info = env.step(action)
        except IllegalActionError as err:
            assert not ok, (action, err)
            counts["illegal_actions"] += 1
            trajectory.append(("error", str(err)))
            calls.append(("act", action, False))
            continue
        assert ok, action
        counts["steps"] += 1
        counts["episodes"] += 1
        calls.append(("act", action, True))
        assert masks.tolist() == [True, budget.admits()]  # the mask is the cap's own admission rule
        assert (terminated, truncated) == (True, False) and env.observation_space.contains(obs)
        assert info["prompt_id"] == problem.id and info["called_help"] == (int(action) == CLOUD_ACTION)
        # The scripted device is right exactly on the easy levels (its definition, not the env's grading).
        assert info["local_correct"] == env.device_correct(problem.id) == (problem.level in EASY_LEVELS)
        if info["called_cloud"]:
            asked.add(problem.id)
        counts["cloud_calls"] += info["called_cloud"]
        counts["refused_calls"] += info["budget"]["over_budget"]
        budget.finish(info, reward, obs[-2:])
        assert env.cloud.stats.calls == len(asked)
        problem = None
        trajectory.append(("step", freeze(obs), reward, freeze(info)))
    env.close()
    return trajectory, calls


def test_fuzz_routing_env(record_testsuite_property, tmp_path):
    cache_dir = str(tmp_path / "routing")

    def check(counts: Counter[str]) -> Callable[..., None]:
        def body(config: dict[str, Any], first_seed: int, drawn: tuple[list[Any], list[Any]]) -> None:
            early, rest = drawn
            ops = [*early, ("reset", first_seed, None), *rest]
            trajectory, calls = run_routing(config, ops, cache_dir, counts)
            again, _ = run_routing(config, ops, cache_dir, Counter())
            assert again == trajectory, "the same seed and calls gave another trajectory"
            replay = [("reset", c[1], c[2]) if c[0] == "reset" else ("step", c[1]) for c in calls if c[-1]]
            replayed, _ = run_routing(config, replay, cache_dir, Counter())
            assert replayed == successes(trajectory), "a call that raised changed the routing env"

        return body

    counts = fuzz(
        record_testsuite_property, "routing", 40, check, env_settings, st.integers(0, 2**32 - 1), routing_ops
    )
    assert (
        min(counts["episodes"], counts["illegal_actions"], counts["config_errors"], counts["refused_calls"])
        > 0
    )


PLAIN = {
    "budget": {"mode": "train", "ratio": 0.5, "window": None, "penalty": 0.0},
    "accuracy": 1.0,
    "marker_match": "lenient",
}

# Regression tests for what the fuzzer first found in DeviceCloudRouting-v0.


def test_routing_env_refuses_an_infinite_action(tmp_path):
    env = make_routing(PLAIN, str(tmp_path))
    env.reset(seed=0)
    with pytest.raises(IllegalActionError):
        env.step(float("inf"))  # int(inf) raised OverflowError


def test_routing_env_reset_that_raises_changes_nothing(tmp_path):
    env = make_routing(PLAIN, str(tmp_path))
    env.reset(seed=0)
    env.step(CLOUD_ACTION)
    with pytest.raises(ConfigError):
        env.reset(seed=3, options={"prompt_id": "x"})  # the budget window was reset before the lookup failed
    assert env.budget.episodes == 1
