"""`DeviceCloud-v0`: token-level device-cloud collaboration, and its numpy-batched vector form."""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from collab_env.budget import CloudBudget
from collab_env.cloud import make_oracle
from collab_env.config import BudgetConfig, DeviceConfig, EnvConfig, TaskConfig, coerce
from collab_env.errors import ConfigError, IllegalActionError, PromptTooLongError
from collab_env.markers import STOP_LENGTH, CompletionState, MarkerDetector
from collab_env.models import load_tokenizer
from collab_env.scoring import EpisodeScorer
from collab_env.tasks import Problem, make_task

RESET_OPTIONS = ("prompt_id", "split", "reset_budget")
VECTOR_RESET_OPTIONS = ("prompt_ids", "split", "reset_budget")


class _Core:
    """What single and vector environments share: task, tokenizer, cloud, scorer, spaces, prompt tokens."""

    def __init__(
        self,
        task: Any,
        device: Any,
        cloud: Any,
        budget: Any,
        reward: Any,
        max_new_tokens: int,
        max_prompt_tokens: int,
        marker_match: str,
        split: str,
    ) -> None:
        self.config = EnvConfig(max_new_tokens, max_prompt_tokens, marker_match, split, reward)
        self.budget_config = coerce(BudgetConfig, budget, "budget")
        self.device_config = coerce(DeviceConfig, device, "device")
        self.task = make_task(coerce(TaskConfig, task, "task"))
        self.tokenizer = load_tokenizer(self.device_config)
        self.detector = MarkerDetector(
            self.tokenizer, self.task.template.stop_text, marker_match == "lenient"
        )
        self.cloud = make_oracle(cloud, self.task)
        self.scorer = EpisodeScorer(self.task, self.cloud, self.config.reward, self.detector)
        self.vocab_size = len(self.tokenizer)
        self.help_action = self.vocab_size
        self.max_len = max_prompt_tokens + max_new_tokens + len(self.detector.help_ids)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self._prompt_ids: dict[int, np.ndarray] = {}
        self.observation_space = spaces.Dict(
            {
                "input_ids": spaces.Box(0, self.vocab_size - 1, (self.max_len,), np.int64),
                "attention_mask": spaces.Box(0, 1, (self.max_len,), np.int8),
                "budget": spaces.Box(0.0, 1.0, (2,), np.float32),
            }
        )
        self.action_space = spaces.Discrete(self.vocab_size + 1)

    def _tokenize(self, problems: list[Problem]) -> list[np.ndarray]:
        # One batched call renders every chat and encodes them together (2-3x faster than one by one).
        batch = self.tokenizer.apply_chat_template(
            [self.task.messages(p) for p in problems],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        return [np.asarray(ids, dtype=np.int64).reshape(-1) for ids in batch]

    def check_prompts(self, chunk: int = 512) -> None:
        """Tokenize every prompt now; PromptTooLongError says how many exceed the window and by how much."""
        todo = [
            p
            for p in self.task.problems("train") + self.task.problems("test")
            if p.id not in self._prompt_ids
        ]
        too_long: dict[int, int] = {}
        for first in range(0, len(todo), chunk):
            problems = todo[first : first + chunk]
            for problem, ids in zip(problems, self._tokenize(problems), strict=True):
                if len(ids) > self.config.max_prompt_tokens:
                    too_long[problem.id] = len(ids)
                else:
                    self._prompt_ids[problem.id] = ids
        if too_long:
            longest = max(too_long, key=too_long.__getitem__)
            raise PromptTooLongError(
                f"{len(too_long)} of {len(self.task)} prompts are longer than env.max_prompt_tokens="
                f"{self.config.max_prompt_tokens} (the longest, prompt {longest}, has {too_long[longest]} "
                f"tokens); raise env.max_prompt_tokens to at least {too_long[longest]} or shorten the questions."
            )

    def prompt_ids(self, problem: Problem) -> np.ndarray:
        """The prompt in the device's chat template with the task's instructions (tokenized once)."""
        if problem.id not in self._prompt_ids:
            ids = self._tokenize([problem])[0]
            if len(ids) > self.config.max_prompt_tokens:
                raise PromptTooLongError(
                    f"prompt {problem.id} has {len(ids)} tokens but env.max_prompt_tokens="
                    f"{self.config.max_prompt_tokens}; raise max_prompt_tokens (or shorten the question)."
                )
            self._prompt_ids[problem.id] = ids
        return self._prompt_ids[problem.id]

    def pick(self, rng: np.random.Generator, split: str) -> Problem:
        problems = self.task.problems(split)
        return problems[int(rng.integers(len(problems)))]

    def check_action(self, action: Any) -> int:
        value = -1
        try:
            # int() would also take a one-element array; the action space holds scalars only.
            if np.ndim(action) == 0 and int(action) == action:
                value = int(action)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
            pass
        if not 0 <= value <= self.help_action:
            raise IllegalActionError(
                f"action {reprlib.repr(action)} is outside the action space Discrete({self.vocab_size + 1}): "
                f"use a token id in [0, {self.vocab_size - 1}] or {self.help_action} (help_action) to call for help."
            )
        return value


class _Episode:
    """One episode in progress, writing its tokens into a row of observation arrays."""

    def __init__(self, core: _Core, budget: CloudBudget) -> None:
        self.core = core
        self.budget = budget
        self.problem: Problem | None = None
        self.state: CompletionState | None = None
        self.done = True
        self.last_info: dict[str, Any] = {}

    def begin(self, problem: Problem, ids_row: np.ndarray, mask_row: np.ndarray) -> dict[str, Any]:
        prompt = self.core.prompt_ids(problem)
        ids_row.fill(self.core.pad_id)
        mask_row.fill(0)
        ids_row[: len(prompt)] = prompt
        mask_row[: len(prompt)] = 1
        self.prompt_len = len(prompt)
        self.problem, self.state, self.done = problem, self.core.detector.start(), False
        self.last_info = {}
        return {"prompt_id": problem.id, "level": problem.level}

    def step(
        self, action: int, ids_row: np.ndarray, mask_row: np.ndarray
    ) -> tuple[float, bool, bool, dict[str, Any]]:
        if self.done or self.state is None:
            raise IllegalActionError("the episode has ended: call reset() before stepping again.")
        state, core = self.state, self.core
        before = len(state.ids)
        stop = state.call_for_help() if action == core.help_action else state.feed(action)
        new = state.ids[before:]
        start = self.prompt_len + before
        ids_row[start : start + len(new)] = new
        mask_row[start : start + len(new)] = 1
        truncated = stop is None and len(state.ids) >= core.config.max_new_tokens
        if stop is None and not truncated:
            return 0.0, False, False, {}
        self.done = True
        reward, self.last_info = core.scorer.finish(self.problem, state, stop or STOP_LENGTH, self.budget)
        return reward, stop is not None, truncated, dict(self.last_info)

    def text(self) -> str:
        if self.problem is None or self.state is None:
            return ""
        completion = self.core.tokenizer.decode(self.state.ids, skip_special_tokens=True)
        status = f"\n[{self.last_info['outcome']}]" if self.last_info else ""
        return f"[prompt {self.problem.id} | {self.problem.level}] {self.problem.question}\n> {completion}{status}"


def _check_options(options: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    """Reset options as a dict, or ConfigError naming the bad key or value (prompt ids are checked by the task)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"reset options must be a dict with keys among {', '.join(allowed)}; got {type(options).__name__}."
        )
    options = dict(options)
    unknown = sorted((k for k in options if k not in allowed), key=repr)
    if unknown:
        raise ConfigError(f"unknown reset option(s) {reprlib.repr(unknown)}; allowed: {', '.join(allowed)}.")
    split = options.get("split", "train")
    if not isinstance(split, str) or split not in ("train", "test"):
        raise ConfigError(f"reset option split={reprlib.repr(split)}; use 'train' or 'test'.")
    # A truthy string such as "no" must not silently start a new budget window.
    if not isinstance(options.get("reset_budget", False), bool | np.bool_):
        raise ConfigError(
            f"reset option reset_budget={reprlib.repr(options['reset_budget'])}; use True or False."
        )
    return options


def _check_seed(seed: Any) -> int | None:
    """A seed as an int (numpy integers included), or ConfigError; gymnasium refuses all but Python ints."""
    if seed is None:
        return None
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0:
        return int(seed)
    raise ConfigError(f"seed={reprlib.repr(seed)} must be a non-negative integer or None.")


class _CoreViews:
    """Read-only views of what single and vector environments share."""

    _core: _Core

    @property
    def tokenizer(self) -> Any:
        return self._core.tokenizer

    @property
    def task(self) -> Any:
        return self._core.task

    @property
    def cloud(self) -> Any:
        return self._core.cloud

    @property
    def help_action(self) -> int:
        return self._core.help_action

    @property
    def config(self) -> EnvConfig:
        return self._core.config


class DeviceCloudEnv(_CoreViews, gym.Env[dict[str, np.ndarray], int]):
    """A small on-device LLM answers a question token by token, or calls a large cloud LLM for help.

    ## Description
    One episode is one prompt of a task (arithmetic by default). The agent is the device model:
    every action writes one token of its answer, or calls for help. After the episode the device's
    answer is graded; a call for help sends the question alone (never the device's attempt) to the
    cloud oracle, at most once per prompt (cached), under a cloud budget. This is the setting of
    Fang et al., "Bridging On-Device and Cloud LLMs for Collaborative Reasoning", arXiv 2509.24050.

    ## Action Space
    `Discrete(vocab_size + 1)`. Actions below `vocab_size` append that token. The last action,
    `help_action`, appends the marker `<unknown> I need external assistance </unknown>` and ends the
    episode. Writing the marker token by token has the same effect (detected on token ids, with a
    lenient text fallback when `marker_match="lenient"`). Any other action raises IllegalActionError.

    ## Observation Space
    `Dict` (all arrays of length `max_len = max_prompt_tokens + max_new_tokens + len(marker tokens)`):

    | key              | space                                 | meaning                                         |
    |------------------|---------------------------------------|-------------------------------------------------|
    | `input_ids`      | `Box(0, vocab_size-1, (max_len,), int64)` | chat-templated prompt, then the completion, right-padded |
    | `attention_mask` | `Box(0, 1, (max_len,), int8)`         | 1 on prompt and completion tokens               |
    | `budget`         | `Box(0, 1, (2,), float32)`            | [target cloud share rho/(1+rho), share used in this budget window] |

    ## Rewards
    0 on every step but the last. At the end, the hierarchical reward (paper v3 eq. 18): `alpha_a`
    (default 1.0) for a correct local answer, `alpha_c` (default 0.3) when help was called and the
    cloud's answer is correct, else 0. `reward={"version": "v1"}` adds the format reward `alpha_f`
    (v1 eq. 5). Budget mode `penalty` subtracts `budget.penalty` per cloud call (v3 App. B).

    ## Starting State
    `reset()` draws a prompt of `split` with the env's RNG. Options: `{"prompt_id": int}` fixes the
    prompt (ids are unique across splits), `{"split": "train" | "test"}`, `{"reset_budget": True}`.
    `reset(seed=...)` also starts a new budget window.

    ## Episode End
    1. Termination: the device writes EOS, calls for help, or completes its answer (`</answer>` in
       the answer-tags template).
    2. Truncation: `max_new_tokens` tokens were written without any of these.
    In budget mode `cap`, a call for help that would push the window's cloud share over
    rho/(1+rho) is refused and the episode is scored on the local answer (`outcome="over_budget"`).

    The final `info` holds `prompt_id`, `level`, `called_help`, `called_cloud` (the cloud was
    asked), `local_correct`, `cloud_correct` (None without a cloud answer), `correct`, `outcome`
    (local_correct | cloud_correct | wrong | over_budget), `local_answer`, `cloud_answer`, `budget`
    (calls, episodes, ratio, over_budget), `completion_tokens` and `stop_reason`. It holds no
    wall-clock values: a seeded rerun gives identical infos.

    ## Arguments
    >>> import gymnasium as gym, collab_env
    >>> env = gym.make("DeviceCloud-v0", cloud={"name": "simulated", "cache_path": ":memory:"})
    >>> obs, info = env.reset(seed=0)
    >>> sorted(obs)
    ['attention_mask', 'budget', 'input_ids']
    >>> obs, reward, terminated, truncated, info = env.step(env.unwrapped.help_action)
    >>> terminated, info["called_help"]
    (True, True)

    | argument            | type             | default        | description                                  |
    |---------------------|------------------|----------------|----------------------------------------------|
    | `task`              | str, dict, TaskConfig | "arithmetic" | task source, template, sizes (`TaskConfig`) |
    | `device`            | str, dict, DeviceConfig | "smollm2" | whose tokenizer the env uses               |
    | `cloud`             | str, dict, CloudConfig | "simulated" | cloud oracle and its answer cache           |
    | `budget`            | dict, BudgetConfig | rho = 3/7, mode train | cloud budget (`BudgetConfig`)         |
    | `reward`            | dict, RewardConfig | v3, 1.0 / 0.3 | hierarchical reward weights               |
    | `max_new_tokens`    | int              | 64             | device tokens before truncation              |
    | `max_prompt_tokens` | int              | 256            | prompt window                                |
    | `marker_match`      | str              | "lenient"      | "strict" or "lenient" call-for-help matching |
    | `split`             | str              | "train"        | split reset() draws from                     |
    | `render_mode`       | str or None      | None           | "ansi" returns the prompt and completion     |

    `env.unwrapped` exposes `tokenizer`, `task`, `cloud` (the cached oracle, with `.stats`),
    `help_action`, and `score(prompt_id, completion_token_ids)`, which ends an episode through
    the same code as `step` for trainers that generate outside the env.

    ## Vectorized environment
    `gym.make_vec("DeviceCloud-v0", num_envs=N, vectorization_mode="vector_entry_point")` returns a
    `DeviceCloudVectorEnv` (numpy-batched, one process, next-step autoreset); reset option
    `{"prompt_ids": [...]}` fixes one prompt per sub-env, e.g. G sub-envs on one prompt.

    ## Version History
    - v0: first version (v3 reward weights by default, v1 format reward optional).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        task: Any = "arithmetic",
        device: Any = "smollm2",
        cloud: Any = "simulated",
        budget: Any = None,
        reward: Any = None,
        max_new_tokens: int = 64,
        max_prompt_tokens: int = 256,
        marker_match: str = "lenient",
        split: str = "train",
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(
                f"render_mode={render_mode!r}; use one of {self.metadata['render_modes']} or None."
            )
        self._core = _Core(
            task, device, cloud, budget, reward, max_new_tokens, max_prompt_tokens, marker_match, split
        )
        self.render_mode = render_mode
        self.observation_space = self._core.observation_space
        self.action_space = self._core.action_space
        self.budget = CloudBudget(self._core.budget_config)
        self._episode = _Episode(self._core, self.budget)
        self._ids = np.full(self._core.max_len, self._core.pad_id, dtype=np.int64)
        self._mask = np.zeros(self._core.max_len, dtype=np.int8)

    def _obs(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self._ids.copy(),
            "attention_mask": self._mask.copy(),
            "budget": self.budget.observation(),
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        # Everything a caller can get wrong is checked before anything changes, so a reset that raises
        # ConfigError leaves the RNG, the budget window and the episode as they were.
        options = _check_options(options, RESET_OPTIONS)
        seed = _check_seed(seed)
        problem = self._core.task.problem(options["prompt_id"]) if "prompt_id" in options else None
        super().reset(seed=seed)
        if seed is not None or options.get("reset_budget"):
            self.budget.reset_window()
        if problem is None:
            problem = self._core.pick(self.np_random, options.get("split", self._core.config.split))
        info = self._episode.begin(problem, self._ids, self._mask)
        return self._obs(), info

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        token = self._core.check_action(action)
        reward, terminated, truncated, info = self._episode.step(token, self._ids, self._mask)
        return self._obs(), reward, terminated, truncated, info

    def score(self, prompt_id: int, completion_token_ids: Any) -> tuple[float, dict[str, Any]]:
        """Reward and info of a completion generated outside the env, by the code that ends `step`.

        Tokens after the first stop (EOS, marker, end of answer) are ignored; `help_action` may
        appear as a token. Counts against this env's budget like a stepped episode.
        """
        problem = self._core.task.problem(prompt_id)
        state, stop = self._core.scorer.run(
            completion_token_ids, self.help_action, self._core.config.max_new_tokens
        )
        return self._core.scorer.finish(problem, state, stop, self.budget)

    def score_many(self, prompt_ids: list[int], completions: list[Any]) -> list[tuple[float, dict[str, Any]]]:
        """`score` for many completions in order, asking the cloud for all help calls in one batch
        first (except in `cap` mode, where only admitted calls may reach the cloud)."""
        scorer = self._core.scorer
        limit = self._core.config.max_new_tokens
        problems = [self._core.task.problem(pid) for pid in prompt_ids]
        runs = [scorer.run(ids, self.help_action, limit) for ids in completions]
        if self.budget.config.mode != "cap":
            scorer.prefetch(
                [p for p, (state, _) in zip(problems, runs, strict=True) if scorer.calls_help(state)]
            )
        return [
            scorer.finish(p, state, stop, self.budget)
            for p, (state, stop) in zip(problems, runs, strict=True)
        ]

    def start_completion(self) -> CompletionState:
        """A fresh completion with this env's stop rules, for generators that run outside the env:
        `state.feed(token)` returns why the completion stops (eos, help, answer) or None."""
        return self._core.detector.start()

    def prompt_tokens(self, prompt_id: int) -> np.ndarray:
        """Token ids of a prompt as the observation shows them (chat template and instructions)."""
        return self._core.prompt_ids(self._core.task.problem(prompt_id))

    def check_prompts(self) -> None:
        """Tokenize every prompt of both splits now (they are kept for the episodes).

        A prompt longer than `max_prompt_tokens` otherwise raises PromptTooLongError only when it is
        first drawn, which in training can be hours in; trainers call this at start-up instead."""
        self._core.check_prompts()

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return self._episode.text()
        return None

    def close(self) -> None:
        self._core.cloud.close()
        super().close()


class DeviceCloudVectorEnv(_CoreViews, VectorEnv):
    """`num_envs` copies of `DeviceCloudEnv` stepped in one numpy batch, in one process.

    Each sub-env has its own RNG (seeded `seed + i`, like `SyncVectorEnv`) and budget window;
    all share the task, tokenizer and cloud cache. Autoreset is next-step: the step after an
    episode ends ignores that sub-env's action and returns its reset observation. Reset options:
    `{"prompt_ids": [...]}` (one per sub-env), `{"split": ...}`, `{"reset_budget": True}`.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": ["ansi"]}

    def __init__(self, num_envs: int = 1, render_mode: str | None = None, **kwargs: Any) -> None:
        if num_envs < 1:
            raise ConfigError(f"num_envs={num_envs} must be at least 1.")
        self.num_envs = num_envs
        self.render_mode = render_mode
        defaults = {
            "task": "arithmetic", "device": "smollm2", "cloud": "simulated", "budget": None, "reward": None,
            "max_new_tokens": 64, "max_prompt_tokens": 256, "marker_match": "lenient", "split": "train",
        }  # fmt: skip
        unknown = sorted(set(kwargs) - set(defaults))
        if unknown:
            raise ConfigError(
                f"unknown argument(s) {unknown} for DeviceCloud-v0; valid: {', '.join(defaults)}."
            )
        self._core = _Core(**{**defaults, **kwargs})
        self.single_observation_space = self._core.observation_space
        self.single_action_space = self._core.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.budgets = [CloudBudget(self._core.budget_config) for _ in range(num_envs)]
        self._episodes = [_Episode(self._core, b) for b in self.budgets]
        self._rngs = [np.random.default_rng() for _ in range(num_envs)]
        self._ids = np.full((num_envs, self._core.max_len), self._core.pad_id, dtype=np.int64)
        self._mask = np.zeros((num_envs, self._core.max_len), dtype=np.int8)
        self._needs_reset = np.zeros(num_envs, dtype=bool)
        self._split = self._core.config.split

    def _obs(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self._ids.copy(),
            "attention_mask": self._mask.copy(),
            "budget": np.stack([b.observation() for b in self.budgets]),
        }

    def reset(
        self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        # Everything a caller can get wrong is checked before anything changes (see DeviceCloudEnv.reset).
        options = _check_options(options, VECTOR_RESET_OPTIONS)
        rngs = self._rngs
        if seed is not None:
            if isinstance(seed, list | tuple):
                seeds = [_check_seed(s) for s in seed]
            else:
                first = _check_seed(seed)
                seeds = [first + i for i in range(self.num_envs)]
            if len(seeds) != self.num_envs:
                raise ConfigError(f"reset got {len(seeds)} seeds for {self.num_envs} sub-envs.")
            rngs = [seeding.np_random(s)[0] for s in seeds]
        problems: list[Problem | None] = [None] * self.num_envs
        prompt_ids = options.get("prompt_ids")
        if prompt_ids is not None:
            if not isinstance(prompt_ids, list | tuple | np.ndarray) or len(prompt_ids) != self.num_envs:
                raise ConfigError(
                    f"reset option prompt_ids={reprlib.repr(prompt_ids)} must list one id for each of the "
                    f"{self.num_envs} sub-envs."
                )
            problems = [self._core.task.problem(pid) for pid in prompt_ids]
        self._rngs = rngs
        infos: dict[str, Any] = {}
        split = self._split = options.get("split", self._core.config.split)
        for i, (episode, problem) in enumerate(zip(self._episodes, problems, strict=True)):
            if seed is not None or options.get("reset_budget"):
                self.budgets[i].reset_window()
            if problem is None:
                problem = self._core.pick(self._rngs[i], split)
            infos = self._add_info(infos, episode.begin(problem, self._ids[i], self._mask[i]), i)
        self._needs_reset[:] = False
        return self._obs(), infos

    def step(
        self, actions: Any
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        try:
            actions = np.asarray(actions)
        except (TypeError, ValueError) as err:  # e.g. a ragged list
            raise IllegalActionError(f"actions must be an array of shape ({self.num_envs},): {err}") from None
        if actions.shape != (self.num_envs,):
            raise IllegalActionError(f"actions must have shape ({self.num_envs},), got {actions.shape}.")
        if any(e.done and not pending for e, pending in zip(self._episodes, self._needs_reset, strict=True)):
            raise IllegalActionError("call reset() before stepping the vector env.")
        # Every action is checked before any sub-env moves: an illegal one in sub-env k must not leave
        # sub-envs before k stepped (their finished episodes would then never be autoreset).
        tokens = [
            None if pending else self._core.check_action(action)
            for action, pending in zip(actions, self._needs_reset, strict=True)
        ]
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        infos: dict[str, Any] = {}
        for i, episode in enumerate(self._episodes):
            if self._needs_reset[i]:
                problem = self._core.pick(self._rngs[i], self._split)
                infos = self._add_info(infos, episode.begin(problem, self._ids[i], self._mask[i]), i)
                self._needs_reset[i] = False
                continue
            rewards[i], terminated[i], truncated[i], info = episode.step(
                tokens[i], self._ids[i], self._mask[i]
            )
            if info:
                infos = self._add_info(infos, info, i)
        self._needs_reset = terminated | truncated
        return self._obs(), rewards, terminated, truncated, infos

    def score(
        self, prompt_id: int, completion_token_ids: Any, env_index: int = 0
    ) -> tuple[float, dict[str, Any]]:
        """`DeviceCloudEnv.score` against the budget of sub-env `env_index`."""
        problem = self._core.task.problem(prompt_id)
        state, stop = self._core.scorer.run(
            completion_token_ids, self.help_action, self._core.config.max_new_tokens
        )
        return self._core.scorer.finish(problem, state, stop, self.budgets[env_index])

    def render(self) -> tuple[str, ...] | None:
        if self.render_mode == "ansi":
            return tuple(e.text() for e in self._episodes)
        return None

    def close_extras(self, **kwargs: Any) -> None:
        self._core.cloud.close()
