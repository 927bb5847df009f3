"""`DeviceCloudRouting-v0`: one routing decision per prompt, on the device's cached answers.

The device model answers every prompt once (batched, greedy, with the token-level env's stop
rules) and the answers are cached on disk; so are the prompt features. A step then only grades a
cached answer or asks the (cached) cloud, which makes this the cheap place for Stable-Baselines3,
Tianshou and prompt-router baselines, on the same tasks, verifiers, cloud, budget and reward as
`DeviceCloud-v0`.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from collab_env import paths
from collab_env.budget import CloudBudget
from collab_env.config import EnvConfig
from collab_env.core import (
    RESET_OPTIONS,
    EnvCore,
    check_render_mode,
    check_reset_options,
    check_seed,
    integer_action,
)
from collab_env.errors import ConfigError, IllegalActionError, unknown_name
from collab_env.features import (
    FEATURE_BOUNDS,
    FEATURES,
    device_answers_key,
    device_features,
    digest,
    features_key,
    greedy_completions,
    minilm_features,
    ngram_features,
)
from collab_env.markers import STOP_HELP
from collab_env.models import load_model
from collab_env.tasks import TEMPLATES, Problem, Task, parse_number

DEVICE_ACTION, CLOUD_ACTION = 0, 1
"""The routing env's actions: answer on the device, or send the question to the cloud."""

DeviceAnswers = Mapping[int, str | Sequence[int]] | Callable[[Problem], str | Sequence[int]]
"""Precomputed device completions: prompt id -> text or token ids, or a function of the Problem."""


def scripted_device(
    correct_levels: Collection[str], template: str = "answer_tags"
) -> Callable[[Problem], str]:
    """`device_answers` of a device with a known spread of competence, for experiments without an LM:
    the right answer on prompts of `correct_levels`, the truth plus one elsewhere, in `template`'s format."""
    if template not in TEMPLATES:
        raise unknown_name("template", template, TEMPLATES, field="template")
    render = TEMPLATES[template].render_answer
    levels = set(correct_levels)

    def answer(problem: Problem) -> str:
        if problem.level in levels:
            return render(problem.answer)
        truth = parse_number(problem.answer)
        return render(str(truth + 1) if truth is not None else "none")

    return answer


class DeviceCloudRoutingEnv(gym.Env[np.ndarray, int]):
    """Route each prompt to the on-device LLM or to the cloud LLM, before the device answers.

    ## Description
    One episode is one prompt of a task (arithmetic by default). The agent is a router: it sees
    features of the prompt and the state of the cloud budget, and decides once whether the device
    model's answer is used or the question goes to the cloud. The device's answer to every prompt
    is generated once (greedy, batched, with `DeviceCloud-v0`'s stop rules) and cached on disk, so
    a step costs no model call. Tasks, verifiers, cloud oracles (cached), budget and reward are
    those of `DeviceCloud-v0`; a prompt router cannot see difficulty that only shows in the
    device's attempt (e.g. `add2` vs `add2_carry`), which is what separates it from `DeviceCloud-v0`.

    ## Action Space
    `Discrete(2)`: 0 answer on the device (its cached completion is graded), 1 call the cloud
    with the question alone. `action_masks()` gives `[True, cloud admitted]` for sb3-contrib's
    MaskablePPO: in budget mode `cap` the cloud action is masked once the window's share is used.
    Any other action raises IllegalActionError.

    ## Observation Space
    `Box(float32, (feature_dim + 2,))`: the prompt's features (`features`; ranges in
    `FEATURE_BOUNDS`), then the budget as in `DeviceCloud-v0`'s "budget" key: [target cloud share
    rho/(1+rho), share of this budget window's episodes that used the cloud], both in [0, 1].

    ## Rewards
    The hierarchical reward of `DeviceCloud-v0`, through the same scorer: action 0 gets what
    `DeviceCloud-v0` gives the device's completion (`alpha_a` if its answer is correct; a call for
    help written by the device itself is ignored and scores as no answer); action 1 gets what it
    gives an immediate call for help (`alpha_c` if the cloud's answer is correct). Budget mode
    `penalty` subtracts `budget.penalty` per cloud call; in mode `cap` a refused call is scored on
    the device's answer (`outcome="over_budget"`), as the paper redirects over-budget requests.

    ## Starting State
    `reset()` draws a prompt of `split` with the env's RNG. Options: `{"prompt_id": int}`,
    `{"split": "train" | "test"}`, `{"reset_budget": True}`; `reset(seed=...)` also starts a new
    budget window. The window spans episodes, so the budget part of the observation carries over.

    ## Episode End
    Every episode terminates after its one step (never truncated). The final `info` has the keys
    of `DeviceCloud-v0`'s (`prompt_id`, `level`, `called_help` = the router asked for the cloud,
    `called_cloud`, `local_correct` = the device's cached answer is correct, `cloud_correct`,
    `correct`, `outcome`, `local_answer`, `cloud_answer`, `budget`, `completion_tokens` of the
    device's answer, `stop_reason`), and no wall-clock values.

    ## Arguments
    >>> import gymnasium as gym, collab_env
    >>> env = gym.make("DeviceCloudRouting-v0", task={"name": "arithmetic", "num_train": 10, "num_test": 5},
    ...                features="ngrams", device_answers=lambda problem: "<answer>0</answer>",
    ...                cloud={"name": "simulated", "cache_path": ":memory:"})
    >>> obs, info = env.reset(seed=0)
    >>> obs.shape, obs.dtype
    ((258,), dtype('float32'))
    >>> obs, reward, terminated, truncated, info = env.step(1)
    >>> terminated, info["called_cloud"]
    (True, True)

    | argument            | type                    | default        | description                       |
    |---------------------|-------------------------|----------------|-----------------------------------|
    | `task`              | str, dict, TaskConfig   | "arithmetic"   | task source, template, sizes      |
    | `device`            | str, dict, DeviceConfig | "smollm2"      | the device model being routed     |
    | `cloud`             | str, dict, CloudConfig  | "simulated"    | cloud oracle and its answer cache |
    | `budget`            | dict, BudgetConfig      | rho=3/7, train | cloud budget                      |
    | `reward`            | dict, RewardConfig      | v3, 1.0/0.3    | hierarchical reward weights       |
    | `max_new_tokens`    | int                     | 64             | device tokens per answer          |
    | `max_prompt_tokens` | int                     | 256            | prompt window                     |
    | `marker_match`      | str                     | "lenient"      | stop rule for a marker it writes  |
    | `split`             | str                     | "train"        | split reset() draws from          |
    | `features`          | str                     | "minilm"       | minilm, device or ngrams          |
    | `device_answers`    | mapping or callable     | None           | precomputed completions           |
    | `cache_dir`         | str or None             | None           | answer and feature caches         |
    | `batch_size`        | int                     | 32             | prompts per generation batch      |
    | `render_mode`       | str or None             | None           | "ansi": prompt, answer, outcome   |

    `device_answers` maps each prompt id (both splits) to a completion, as text or token ids, or is a
    function of the `Problem` (see `scripted_device`); None generates the answers with the device
    model. `cache_dir` None means `<user cache>/routing`.

    The device's answers are cached by the device model's identity (settings, and file sizes and
    times of a model directory), the task's settings (template included), `max_new_tokens` and
    `marker_match`; features by kind, task and (for `device`) model. `env.unwrapped` exposes
    `task`, `cloud`, `tokenizer`, `budget`, `device_completion(prompt_id)` and
    `device_correct(prompt_id)` (what an oracle router needs).

    ## Version History
    - v0: first version.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        task: Any = "arithmetic",
        device: Any = "smollm2",
        cloud: Any = "simulated",
        budget: Any = None,
        reward: Any = None,
        max_new_tokens: int = EnvConfig.max_new_tokens,
        max_prompt_tokens: int = EnvConfig.max_prompt_tokens,
        marker_match: str = EnvConfig.marker_match,
        split: str = EnvConfig.split,
        features: str = "minilm",
        device_answers: DeviceAnswers | None = None,
        cache_dir: str | None = None,
        batch_size: int = 32,
        render_mode: str | None = None,
    ) -> None:
        check_render_mode(render_mode, self.metadata["render_modes"])
        if features not in FEATURES:
            raise unknown_name("feature kind", features, FEATURES, field="features")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1.")
        self._core = EnvCore(
            task, device, cloud, budget, reward, max_new_tokens, max_prompt_tokens, marker_match, split
        )
        self.render_mode = render_mode
        self.features = features
        self.batch_size = batch_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else paths.cache_dir() / "routing"
        self.budget = CloudBudget(self._core.budget_config)
        self._model: Any = None
        task_ = self._core.task
        self._problems = [task_.problem(i) for i in range(len(task_))]
        completions = (
            self._given_completions(device_answers)
            if device_answers is not None
            else self._generated_completions()
        )
        scorer, limit = self._core.scorer, self._core.config.max_new_tokens
        self._runs = [scorer.run(ids, self._core.help_action, limit) for ids in completions]
        low, high = FEATURE_BOUNDS[features]
        # Clipping only absorbs float32 rounding of unit-norm vectors at the bounds.
        self._features = np.clip(self._prompt_features(), low, high)
        self._model = None  # the device model is only needed to fill the caches
        dim = self._features.shape[1]
        self.observation_space = spaces.Box(
            low=np.concatenate([np.full(dim, low), np.zeros(2)]).astype(np.float32),
            high=np.concatenate([np.full(dim, high), np.ones(2)]).astype(np.float32),
            dtype=np.float32,
        )
        self.action_space = spaces.Discrete(2)
        self._problem: Problem | None = None
        self._last: tuple[Problem, dict[str, Any]] | None = None

    @property
    def task(self) -> Task:
        return self._core.task

    @property
    def cloud(self) -> Any:
        return self._core.cloud

    @property
    def tokenizer(self) -> Any:
        return self._core.tokenizer

    @property
    def feature_dim(self) -> int:
        return int(self._features.shape[1])

    def device_completion(self, prompt_id: int) -> list[int]:
        """The device's cached completion (token ids up to its stop) of a prompt."""
        return list(self._runs[self.task.problem(prompt_id).id][0].ids)

    def device_correct(self, prompt_id: int) -> bool:
        """Whether the device's cached answer to a prompt is correct (what an oracle router knows)."""
        problem = self.task.problem(prompt_id)
        text = self.tokenizer.decode(self._runs[problem.id][0].ids, skip_special_tokens=True)
        return self.task.verify(problem, self.task.extract_answer(text))

    def action_masks(self) -> np.ndarray:
        """[device, cloud] admissible now: the cloud is masked when the cap would refuse the call.

        The budget's own admission rule decides; nothing is counted."""
        return np.array([True, self.budget.would_admit()], dtype=bool)

    def _device_model(self) -> Any:
        if self._model is None:
            import torch

            self._model = load_model(
                self._core.device_config, device="cuda" if torch.cuda.is_available() else "cpu"
            )
        return self._model

    def _given_completions(self, answers: DeviceAnswers) -> list[list[int]]:
        encode = self._core.tokenizer.encode
        completions, missing = [], []
        for problem in self._problems:
            if callable(answers):
                value = answers(problem)
            elif problem.id in answers:
                value = answers[problem.id]
            else:
                missing.append(problem.id)
                continue
            ids = encode(value, add_special_tokens=False) if isinstance(value, str) else value
            completions.append([int(t) for t in ids])
        if missing:
            raise ConfigError(
                f"device_answers has no completion for {len(missing)} prompt id(s) (first: {missing[:5]}); "
                f"give one for every prompt of both splits (ids 0..{len(self._problems) - 1}) or pass a "
                "function of the Problem."
            )
        return completions

    def _generated_completions(self) -> list[list[int]]:
        core = self._core
        key = device_answers_key(
            core.device_config, core.task, core.config.max_new_tokens, core.config.marker_match
        )
        path = self.cache_dir / f"device-answers-{digest(key)}.json"
        if path.is_file():
            return json.loads(path.read_text())["completions"]
        paths.note(
            f"generating the device's greedy answers to {len(self._problems)} prompts (once; cache: {path})"
        )
        completions = greedy_completions(
            self._device_model(),
            [core.prompt_ids(p) for p in self._problems],
            core.detector.start,
            core.config.max_new_tokens,
            core.pad_id,
            core.vocab_size,
            self.batch_size,
        )
        paths.write_atomic(
            path, lambda tmp: tmp.write_text(json.dumps({"key": key, "completions": completions}))
        )
        return completions

    def _prompt_features(self) -> np.ndarray:
        questions = [p.question for p in self._problems]
        if self.features == "ngrams":
            return ngram_features(questions)
        key = features_key(self.features, self._core.task, self._core.device_config)
        path = self.cache_dir / f"features-{self.features}-{digest(key)}.npy"
        if path.is_file():
            return np.load(path)
        if self.features == "device":
            prompts = [self._core.prompt_ids(p) for p in self._problems]
            values = device_features(self._device_model(), prompts, self._core.pad_id, self.batch_size)
        else:
            values = minilm_features(questions, self.batch_size)
        paths.write_atomic(path, lambda tmp: np.save(tmp, values))
        return values

    def _obs(self, problem: Problem) -> np.ndarray:
        return np.concatenate([self._features[problem.id], self.budget.observation()]).astype(np.float32)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        # As in DeviceCloud-v0, everything a caller can get wrong is checked before anything changes, so
        # a reset that raises ConfigError leaves the RNG and the budget window as they were.
        options = check_reset_options(options, RESET_OPTIONS)
        seed = check_seed(seed)
        problem = self.task.problem(options["prompt_id"]) if "prompt_id" in options else None
        super().reset(seed=seed)
        if seed is not None or options.get("reset_budget"):
            self.budget.reset_window()
        if problem is None:
            problem = self._core.pick(self.np_random, options.get("split", self._core.config.split))
        self._problem, self._last = problem, None
        return self._obs(problem), {"prompt_id": problem.id, "level": problem.level}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._problem is None:
            raise IllegalActionError("the episode has ended: call reset() before stepping again.")
        choice = integer_action(action)
        if choice not in (DEVICE_ACTION, CLOUD_ACTION):
            raise IllegalActionError(
                f"action {reprlib.repr(action)} is outside the action space Discrete(2): use 0 to answer on "
                "the device or 1 to call the cloud."
            )
        problem, self._problem = self._problem, None
        state, stop = self._runs[problem.id]
        to_cloud = choice == CLOUD_ACTION
        reward, info = self._core.scorer.finish_routed(
            problem, state, STOP_HELP if to_cloud else stop, self.budget, called_help=to_cloud
        )
        self._last = (problem, info)
        return self._obs(problem), reward, True, False, dict(info)

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        problem, info = self._last if self._last else (self._problem, None)
        if problem is None:
            return ""
        answer = self.tokenizer.decode(self._runs[problem.id][0].ids, skip_special_tokens=True)
        status = f"\n[{'cloud' if info['called_help'] else 'device'}: {info['outcome']}]" if info else ""
        return f"[prompt {problem.id} | {problem.level}] {problem.question}\n> device: {answer}{status}"

    def close(self) -> None:
        self._core.cloud.close()
        super().close()
