"""What every DeviceCloud environment builds on: the core (task, tokenizer, cloud, scorer, spaces,
prompt tokens), one episode in progress, and the checks of seeds, reset options and actions."""

from __future__ import annotations

import inspect
import numbers
import reprlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from gymnasium import spaces

from collab_env.budget import CloudBudget
from collab_env.cloud import make_oracle
from collab_env.config import SPLITS, BudgetConfig, DeviceConfig, EnvConfig, TaskConfig, coerce
from collab_env.errors import ConfigError, IllegalActionError, PromptTooLongError
from collab_env.markers import STOP_LENGTH, CompletionState, HelpBranch, MarkerDetector, help_branches
from collab_env.models import load_tokenizer
from collab_env.scoring import EpisodeScorer, action_space_error, integer_action
from collab_env.tasks import Problem, make_task
from collab_env.tasks.templates import STEP_SEPARATOR, render_trace

RESET_OPTIONS = ("prompt_id", "split", "reset_budget")
"""Keys a single environment's reset() options may hold."""
VECTOR_RESET_OPTIONS = ("prompt_ids", "split", "reset_budget")
"""Keys the vector environment's reset() options may hold."""


class EnvCore:
    """What single and vector environments share: task, tokenizer, cloud, scorer, spaces, prompt tokens.

    The defaults are those of `DeviceCloud-v0`; the settings of the environment itself default to
    `EnvConfig`'s."""

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
        todo = [p for split in SPLITS for p in self.task.problems(split) if p.id not in self._prompt_ids]
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

    def help_openings(self) -> tuple[str, ...]:
        """What a completion may write where it could call for help instead: the answer as the template
        renders it (with and without a leading space) or, for a device that writes its steps
        (`device.recipe.trace`), the opening of its trace and the next step after one."""
        answer = self.task.template.render_answer("0")
        if self.device_config.writes_trace:
            return (render_trace(["0"]) + answer, STEP_SEPARATOR + "0")
        return (answer, " " + answer)

    def help_branches(self) -> list[HelpBranch]:
        """Where this env's completions branch into the marker: the branch token is the help action."""
        return help_branches(self.tokenizer, self.help_openings())

    def pick(self, rng: np.random.Generator, split: str) -> Problem:
        problems = self.task.problems(split)
        return problems[int(rng.integers(len(problems)))]

    def check_action(self, action: Any) -> int:
        value = integer_action(action)
        if value is None or not 0 <= value <= self.help_action:
            raise action_space_error(action, self.help_action)  # `score` raises the same for a token
        return value


ENV_ARGUMENTS = tuple(inspect.signature(EnvCore).parameters)
"""The arguments every DeviceCloud environment passes on to `EnvCore`, in order."""


class Episode:
    """One episode in progress, writing its tokens into a row of observation arrays."""

    def __init__(self, core: EnvCore, budget: CloudBudget) -> None:
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


def check_reset_options(options: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
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
    if not isinstance(split, str) or split not in SPLITS:
        raise ConfigError(f"reset option split={reprlib.repr(split)}; use one of: {', '.join(SPLITS)}.")
    # A truthy string such as "no" must not silently start a new budget window.
    if not isinstance(options.get("reset_budget", False), bool | np.bool_):
        raise ConfigError(
            f"reset option reset_budget={reprlib.repr(options['reset_budget'])}; use True or False."
        )
    return options


def check_seed(seed: Any) -> int | None:
    """A seed as an int (numpy integers included), or ConfigError; gymnasium refuses all but Python ints."""
    if seed is None:
        return None
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0:
        return int(seed)
    raise ConfigError(f"seed={reprlib.repr(seed)} must be a non-negative integer or None.")


def check_render_mode(render_mode: str | None, render_modes: list[str]) -> None:
    """ConfigError unless `render_mode` is None or one of the environment's `render_modes`."""
    if render_mode is not None and render_mode not in render_modes:
        raise ConfigError(f"render_mode={render_mode!r}; use one of {render_modes} or None.")


class CoreViews:
    """Read-only views of what single and vector environments share."""

    _core: EnvCore

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

    def help_branches(self) -> list[HelpBranch]:
        """Where completions branch into the call-for-help marker (`EnvCore.help_branches`)."""
        return self._core.help_branches()
