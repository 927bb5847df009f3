"""`DeviceCloudRouting-v0`: one routing decision per prompt, on the device's cached answers.

The device model answers each prompt once (greedy, with the token-level env's stop rules), the
first time the prompt is drawn, in a batch with the prompts the seeded draw picks next; answers and
prompt features are cached on disk per prompt. A step then only grades a cached answer or asks the
(cached) cloud, which makes this the cheap place for Stable-Baselines3, Tianshou and prompt-router
baselines, on the same tasks, verifiers, cloud, budget and reward as `DeviceCloud-v0`.
"""

from __future__ import annotations

import copy
import reprlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from collab_env import paths
from collab_env.budget import CloudBudget
from collab_env.config import DeviceConfig, EnvConfig, coerce
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
    FEATURE_DIMS,
    FEATURES,
    DeviceAnswers,
    PromptStore,
    device_answers_key,
    device_features,
    digest,
    features_key,
    given_completions,
    greedy_completions,
    minilm_features,
    ngram_features,
    open_cache,
    prefetch_batch,
    scripted_device,
)
from collab_env.markers import STOP_HELP, CompletionState
from collab_env.models import load_model, smollm2_model_dir
from collab_env.tasks import Problem, Task

DEVICE_ACTION, CLOUD_ACTION = 0, 1
"""The routing env's actions: answer on the device, or send the question to the cloud."""
__all__ = ["CLOUD_ACTION", "DEVICE_ACTION", "DeviceAnswers", "DeviceCloudRoutingEnv", "scripted_device"]


class DeviceCloudRoutingEnv(gym.Env[np.ndarray, int]):
    """Route each prompt to the on-device LLM or to the cloud LLM, before the device answers.

    ## Description
    One episode is one prompt of a task (arithmetic by default). The agent is a router: it sees
    features of the prompt and the state of the cloud budget, and decides once whether the device
    model's answer is used or the question goes to the cloud. The device's answer to a prompt is
    generated once (greedy, with `DeviceCloud-v0`'s stop rules) when the prompt is first drawn and
    cached on disk, so a step costs no model call. Tasks, verifiers, cloud oracles (cached), budget
    and reward are those of `DeviceCloud-v0`; a prompt router cannot see difficulty that only shows
    in the device's attempt (e.g. `add2` vs `add2_carry`): that separates it from `DeviceCloud-v0`.

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
    | `prefetch`          | int                     | 16             | prompts made ready per cache miss |
    | `render_mode`       | str or None             | None           | "ansi": prompt, answer, outcome   |

    `device_answers` maps each prompt id (both splits) to a completion, as text or token ids, or is a
    function of the `Problem` (see `scripted_device`); None generates the answers with the device
    model. `cache_dir` None means `<user cache>/routing`.

    ## What the first calls cost
    Answers and features (`minilm`, `device`) are made lazily: when `reset()` draws a prompt that is
    not ready, the device answers it together with up to `prefetch - 1` others, first the prompts the
    env's RNG will draw next (read from a copy of it), then the following prompts of its split; their
    features are computed in the same batch, and both are added to the disk cache. `gym.make` loads
    the device model only when nothing of this configuration is cached yet (a missing model then fails
    at once) and otherwise when a prompt first needs it; it is dropped once every prompt is ready.
    `precompute()` does the full pass up front. `features="ngrams"` needs no model and is computed at
    once. On an idle 2-core CPU with an empty cache (`DEVICECLOUD_CACHE` a fresh directory) and torch's
    default threads, `gym.make("DeviceCloudRouting-v0")` with no arguments takes 8-10 s (~8-9 s converting
    SmolLM2 from GGUF, once), the first `reset()` 15-16 s (SmolLM2's first 16 answers of 64 tokens, and
    MiniLM), 10 steps ~0 s: 23-26 s in all, 2-3 s once cached. With another job on one core: 35 s with
    `OMP_NUM_THREADS=1`, but 2-5 min with torch's default two threads on the shared cores. Later
    misses: ~15 s per 16 prompts.

    The device's answers are cached by the device model's identity (settings, and file sizes and
    times of a model directory), the task's settings (template included), `max_new_tokens` and
    `marker_match`; features by kind, task and (for `device`) model. `env.unwrapped` exposes
    `task`, `cloud`, `tokenizer`, `budget`, `device_completion(prompt_id)`, `device_correct(prompt_id)`
    (what an oracle router needs; they answer the prompt if needed) and `precompute(split=None)`.

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
        prefetch: int = 16,
        render_mode: str | None = None,
    ) -> None:
        check_render_mode(render_mode, self.metadata["render_modes"])
        if features not in FEATURES:
            raise unknown_name("feature kind", features, FEATURES, field="features")
        for name, value in (("batch_size", batch_size), ("prefetch", prefetch)):
            if value < 1:
                raise ConfigError(f"{name}={value} must be at least 1.")
        device = coerce(DeviceConfig, device, "device")
        if device_answers is None and device.name == "smollm2" and not device.path:
            # The converted model directory holds the tokenizer as well: converting it before the env
            # loads its tokenizer spares the separate tokenizer extraction (~12 s on an empty cache).
            smollm2_model_dir()
        self._core = EnvCore(
            task, device, cloud, budget, reward, max_new_tokens, max_prompt_tokens, marker_match, split
        )
        self.render_mode = render_mode
        self.features = features
        self.batch_size = batch_size
        self.prefetch = prefetch
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else paths.cache_dir() / "routing"
        self.budget = CloudBudget(self._core.budget_config)
        self._model: Any = None
        self._noted = False
        task_ = self._core.task
        self._problems = [task_.problem(i) for i in range(len(task_))]
        self._runs: dict[int, tuple[CompletionState, str | None]] = {}
        self._rows: dict[int, np.ndarray] = {}
        self._answer_store: PromptStore | None = None
        self._feature_store: PromptStore | None = None
        if device_answers is not None:
            encode = self._core.tokenizer.encode
            self._add_runs(dict(enumerate(given_completions(device_answers, self._problems, encode))))
        else:
            self._answer_store = self._open_answers()
        self._open_features()
        if (self._answer_store is not None and not self._runs) or (features == "device" and not self._rows):
            self._device_model()  # nothing cached yet: the model is needed, and a missing one fails here
        if features == "device" and not self._rows:
            self._fill([self._problems[0]])  # the hidden size, from one prompt's features
        dim = FEATURE_DIMS.get(features) or len(next(iter(self._rows.values())))
        low, high = FEATURE_BOUNDS[features]
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
        return int(self.observation_space.shape[0]) - 2

    def device_completion(self, prompt_id: int) -> list[int]:
        """The device's cached completion (token ids up to its stop) of a prompt (answered now if needed)."""
        problem = self.task.problem(prompt_id)
        self._make_ready(problem)
        return list(self._runs[problem.id][0].ids)

    def device_correct(self, prompt_id: int) -> bool:
        """Whether the device's cached answer to a prompt is correct (what an oracle router knows)."""
        problem = self.task.problem(prompt_id)
        self._make_ready(problem)
        state = self._runs[problem.id][0]
        text = self.tokenizer.decode(state.ids, skip_special_tokens=True)
        gave_up = state.called_help or self._core.detector.untagged_call(text)  # as in scoring.py
        return not gave_up and self.task.verify(problem, self.task.extract_answer(text))

    def action_masks(self) -> np.ndarray:
        """[device, cloud] admissible now: the cloud is masked when the cap would refuse the call.

        The budget's own admission rule decides; nothing is counted."""
        return np.array([True, self.budget.would_admit()], dtype=bool)

    def precompute(self, split: str | None = None) -> None:
        """Answer and featurize every prompt of `split` (None: both) now, `batch_size` at a time,
        instead of as they are drawn; what is cached already is not computed again."""
        problems = self._problems if split is None else self.task.problems(split)
        todo = [p for p in problems if not self._ready(p)]
        for first in range(0, len(todo), self.batch_size):
            self._fill(todo[first : first + self.batch_size])

    def _device_model(self) -> Any:
        if self._model is None:
            import torch

            self._model = load_model(
                self._core.device_config, device="cuda" if torch.cuda.is_available() else "cpu"
            )
        return self._model

    def _open_answers(self) -> PromptStore:
        core = self._core
        key = device_answers_key(
            core.device_config, core.task, core.config.max_new_tokens, core.config.marker_match
        )
        store, rows = open_cache(self.cache_dir, f"device-answers-{digest(key)}", key, "int32")
        self._add_runs(rows)
        return store

    def _open_features(self) -> None:
        if self.features == "ngrams":
            self._add_rows(dict(enumerate(ngram_features([p.question for p in self._problems]))))
            return
        key = features_key(self.features, self._core.task, self._core.device_config)
        name = f"features-{self.features}-{digest(key)}"
        self._feature_store, rows = open_cache(self.cache_dir, name, key, "float32")
        self._add_rows(rows)

    def _add_runs(self, completions: Mapping[int, Any]) -> None:
        core = self._core
        for prompt_id, ids in completions.items():
            if 0 <= prompt_id < len(self._problems):
                ids = np.asarray(ids, dtype=np.int64).tolist()
                self._runs[prompt_id] = core.scorer.run(ids, core.help_action, core.config.max_new_tokens)

    def _add_rows(self, rows: Mapping[int, np.ndarray]) -> None:
        low, high = FEATURE_BOUNDS[self.features]
        for prompt_id, row in rows.items():
            if 0 <= prompt_id < len(self._problems):
                # Clipping only absorbs float32 rounding of unit-norm vectors at the bounds.
                self._rows[prompt_id] = np.clip(np.asarray(row, dtype=np.float32), low, high)

    def _ready(self, problem: Problem) -> bool:
        return problem.id in self._runs and problem.id in self._rows

    def _make_ready(self, problem: Problem, upcoming: Iterable[Problem] = ()) -> None:
        """Answer and featurize `problem` if it is not ready, with up to `prefetch - 1` other prompts that
        are not: first `upcoming` (the prompts reset() draws next), then those after it in its split."""
        if not self._ready(problem):
            split = self.task.problems(problem.split)
            self._fill(prefetch_batch(problem, split, upcoming, self._ready, self.prefetch))

    def _fill(self, problems: list[Problem]) -> None:
        core = self._core
        unanswered = [p for p in problems if p.id not in self._runs]
        if unanswered:  # never with given device answers, which cover every prompt
            assert self._answer_store is not None
            if not self._noted:
                self._noted = True
                paths.note(f"answering prompts as they are first drawn (cache: {self._answer_store.path})")
            completions = greedy_completions(
                self._device_model(),
                [core.prompt_ids(p) for p in unanswered],
                core.detector.start,
                core.config.max_new_tokens,
                core.pad_id,
                core.vocab_size,
                self.batch_size,
            )
            answers = {p.id: c for p, c in zip(unanswered, completions, strict=True)}
            self._answer_store.add(answers)
            self._add_runs(answers)
        featureless = [p for p in problems if p.id not in self._rows]
        if featureless:  # never with ngrams, which are computed at once
            assert self._feature_store is not None
            if self.features == "device":
                prompts = [core.prompt_ids(p) for p in featureless]
                values = device_features(self._device_model(), prompts, core.pad_id, self.batch_size)
            else:
                values = minilm_features([p.question for p in featureless], self.batch_size)
            rows = {p.id: v for p, v in zip(featureless, values, strict=True)}
            self._feature_store.add(rows)
            self._add_rows(rows)
        if len(self._runs) == len(self._rows) == len(self._problems):
            self._model = None  # every prompt is ready: the device model is no longer needed

    def _obs(self, problem: Problem) -> np.ndarray:
        return np.concatenate([self._rows[problem.id], self.budget.observation()]).astype(np.float32)

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
        upcoming: list[Problem] = []
        if problem is None:
            split = options.get("split", self._core.config.split)
            problem = self._core.pick(self.np_random, split)
            if not self._ready(problem):  # what the next resets will draw, read from a copy of the RNG
                rng = copy.deepcopy(self.np_random)
                upcoming = [self._core.pick(rng, split) for _ in range(self.prefetch)]
        self._make_ready(problem, upcoming)
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
