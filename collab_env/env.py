"""`DeviceCloud-v0`: token-level device-cloud collaboration (vector form: `collab_env.vector_env`)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from collab_env.budget import CloudBudget
from collab_env.config import EnvConfig
from collab_env.core import (
    RESET_OPTIONS,
    CoreViews,
    EnvCore,
    Episode,
    check_render_mode,
    check_reset_options,
    check_seed,
)
from collab_env.markers import CompletionState


class DeviceCloudEnv(CoreViews, gym.Env[dict[str, np.ndarray], int]):
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
    `collab_env.vector_env.DeviceCloudVectorEnv` (numpy-batched, one process, next-step autoreset);
    reset option `{"prompt_ids": [...]}` fixes one prompt per sub-env, e.g. G sub-envs on one prompt.

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
        max_new_tokens: int = EnvConfig.max_new_tokens,
        max_prompt_tokens: int = EnvConfig.max_prompt_tokens,
        marker_match: str = EnvConfig.marker_match,
        split: str = EnvConfig.split,
        render_mode: str | None = None,
    ) -> None:
        check_render_mode(render_mode, self.metadata["render_modes"])
        self._core = EnvCore(
            task, device, cloud, budget, reward, max_new_tokens, max_prompt_tokens, marker_match, split
        )
        self.render_mode = render_mode
        self.observation_space = self._core.observation_space
        self.action_space = self._core.action_space
        self.budget = CloudBudget(self._core.budget_config)
        self._episode = Episode(self._core, self.budget)
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
        options = check_reset_options(options, RESET_OPTIONS)
        seed = check_seed(seed)
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
