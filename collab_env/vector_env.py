"""`DeviceCloud-v0`'s vector form: `num_envs` episodes stepped in one numpy batch, in one process."""

from __future__ import annotations

import reprlib
from typing import Any

import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from collab_env.budget import CloudBudget
from collab_env.core import (
    ENV_ARGUMENTS,
    VECTOR_RESET_OPTIONS,
    CoreViews,
    EnvCore,
    Episode,
    check_reset_options,
    check_seed,
)
from collab_env.errors import ConfigError, IllegalActionError
from collab_env.tasks import Problem


class DeviceCloudVectorEnv(CoreViews, VectorEnv):
    """`num_envs` episodes of `DeviceCloud-v0` stepped in one numpy batch, in one process.

    ## Description
    The environment of `collab_env.env.DeviceCloudEnv`, `num_envs` times: every sub-env is one
    prompt answered token by token by the device, which may call the cloud for help. All sub-envs
    share the task, tokenizer, cloud oracle and its answer cache; each has its own RNG and cloud
    budget window. Made by
    `gym.make_vec("DeviceCloud-v0", num_envs=N, vectorization_mode="vector_entry_point")`.

    ## Action Space
    `MultiDiscrete([vocab_size + 1] * num_envs)`: one action of `DeviceCloud-v0` per sub-env (a
    token id, or `help_action` to call for help). The shape must be `(num_envs,)`; every action is
    checked before any sub-env moves, and any illegal one raises IllegalActionError.

    ## Observation Space
    `DeviceCloud-v0`'s `Dict` batched: `input_ids` `(num_envs, max_len)` int64, `attention_mask`
    `(num_envs, max_len)` int8, `budget` `(num_envs, 2)` float32 (each sub-env's own window).

    ## Rewards
    Those of `DeviceCloud-v0`, per sub-env, as a float64 array of shape `(num_envs,)`.

    ## Starting State
    `reset()` draws one prompt of `split` per sub-env, each with its own RNG; `reset(seed=s)`
    seeds sub-env i with `s + i` (like `SyncVectorEnv`; a list gives one seed per sub-env) and
    starts new budget windows. Options: `{"prompt_ids": [...]}` (one per sub-env, e.g. G sub-envs
    on one prompt), `{"split": "train" | "test"}`, `{"reset_budget": True}`.

    ## Episode End
    Each sub-env ends as `DeviceCloud-v0` does (termination and truncation arrays of shape
    `(num_envs,)`). Autoreset is next-step: the step after a sub-env's episode ends ignores its
    action and returns its reset observation, drawn from the split of the last reset. Infos are
    gymnasium's vector infos (`info[key]` an array and `info["_" + key]` the mask of sub-envs
    that set it).

    ## Arguments
    | argument      | type        | default | description                                   |
    |---------------|-------------|---------|-----------------------------------------------|
    | `num_envs`    | int         | 1       | number of sub-envs                            |
    | `render_mode` | str or None | None    | "ansi": a tuple of each sub-env's text        |
    | `**kwargs`    |             |         | `DeviceCloudEnv`'s other arguments (`task`, `device`, `cloud`, `budget`, `reward`, `max_new_tokens`, `max_prompt_tokens`, `marker_match`, `split`) with its defaults; any other name raises ConfigError |

    `score(prompt_id, completion_token_ids, env_index)` scores a completion generated outside the
    env against the budget of sub-env `env_index`.

    ## Version History
    - v0: first version.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": ["ansi"]}

    def __init__(self, num_envs: int = 1, render_mode: str | None = None, **kwargs: Any) -> None:
        if num_envs < 1:
            raise ConfigError(f"num_envs={num_envs} must be at least 1.")
        self.num_envs = num_envs
        self.render_mode = render_mode
        unknown = sorted(set(kwargs) - set(ENV_ARGUMENTS))
        if unknown:
            raise ConfigError(
                f"unknown argument(s) {unknown} for DeviceCloud-v0; valid: {', '.join(ENV_ARGUMENTS)}."
            )
        self._core = EnvCore(**kwargs)
        self.single_observation_space = self._core.observation_space
        self.single_action_space = self._core.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.budgets = [CloudBudget(self._core.budget_config) for _ in range(num_envs)]
        self._episodes = [Episode(self._core, b) for b in self.budgets]
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
        options = check_reset_options(options, VECTOR_RESET_OPTIONS)
        rngs = self._rngs
        if seed is not None:
            if isinstance(seed, list | tuple):
                seeds = [check_seed(s) for s in seed]
            else:
                first = check_seed(seed)
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
