"""What happens when a completion ends: the local answer is graded, a call for help goes through
the budget to the cloud, and the hierarchical reward is computed. `DeviceCloudEnv.step`,
`DeviceCloudEnv.score` and the vector env all end episodes here, so their rewards agree.
"""

from __future__ import annotations

import reprlib
from typing import Any

import numpy as np

from collab_env.budget import CloudBudget
from collab_env.cloud import CachedOracle
from collab_env.config import RewardConfig
from collab_env.errors import IllegalActionError
from collab_env.markers import STOP_HELP, STOP_LENGTH, CompletionState, MarkerDetector
from collab_env.rewards import hierarchical_reward
from collab_env.tasks import Problem, Task

OUTCOMES = ("local_correct", "cloud_correct", "wrong", "over_budget")


def integer_action(action: Any) -> int | None:
    """A scalar action with an integer value as an int, else None (the caller names the action space)."""
    try:
        # int() would also take a one-element array; the action spaces hold scalars only.
        if np.ndim(action) == 0 and int(action) == action:
            return int(action)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
        pass
    return None


def action_space_error(action: Any, help_action: int, where: str = "") -> IllegalActionError:
    """The error for an action outside Discrete(help_action + 1), the same for `step` and `score`."""
    return IllegalActionError(
        f"action {reprlib.repr(action)}{where} is outside the action space Discrete({help_action + 1}): "
        f"use a token id in [0, {help_action - 1}] or {help_action} (help_action) to call for help."
    )


class EpisodeScorer:
    """Grades finished completions of one task against one cloud oracle."""

    def __init__(
        self, task: Task, oracle: CachedOracle, reward: RewardConfig, detector: MarkerDetector
    ) -> None:
        self.task = task
        self.oracle = oracle
        self.reward = reward
        self.detector = detector

    def run(
        self, token_ids: list[int] | Any, help_action: int, max_new_tokens: int
    ) -> tuple[CompletionState, str | None]:
        """Feed a whole completion through the stop rules of `step`; tokens after the first stop
        (or past `max_new_tokens`) are ignored. Returns the state and why it stopped (None: it ran out).

        Every token it reads must be an action `step` accepts (an integer in [0, help_action]), else
        IllegalActionError names it and its position: a negative id would index the token table from
        its end, and a float would be truncated to another token."""
        state = self.detector.start()
        for position, action in enumerate(token_ids):
            token = action if type(action) is int else integer_action(action)
            if token is None or not 0 <= token <= help_action:
                raise action_space_error(action, help_action, f" (token {position} of the completion)")
            stop = state.call_for_help() if token == help_action else state.feed(token)
            if stop is not None:
                return state, stop
            if len(state.ids) >= max_new_tokens:
                return state, STOP_LENGTH
        return state, None

    def calls_help(self, state: CompletionState) -> bool:
        """Whether a finished completion called for help (the marker, or the lenient untagged form)."""
        if state.called_help:
            return True
        return self.detector.untagged_call(
            self.detector.tokenizer.decode(state.ids, skip_special_tokens=True)
        )

    def finish(
        self, problem: Problem, state: CompletionState, stop: str | None, budget: CloudBudget
    ) -> tuple[float, dict[str, Any]]:
        """Reward and info of a finished episode; queries the cloud (cached) when help was called and admitted."""
        return self.finish_routed(problem, state, stop, budget, self.calls_help(state))

    def finish_routed(
        self,
        problem: Problem,
        state: CompletionState,
        stop: str | None,
        budget: CloudBudget,
        called_help: bool,
    ) -> tuple[float, dict[str, Any]]:
        """`finish` with the call for help decided by the caller instead of read from the completion.

        `DeviceCloudRouting-v0` routes before the device answers: its action, not a marker in the
        device's completion, asks the cloud, and a call the cap refuses falls back on that completion.
        """
        text = self.detector.tokenizer.decode(state.ids, skip_special_tokens=True)
        local_answer = self.task.extract_answer(text)
        # A completion that calls for help gives up its own answer, under every template: the device
        # either answers or asks the cloud (the hierarchical reward has no case for both). Without
        # this rule `numbered_steps`, which has no answer stop, would count "... \boxed{85} <unknown>
        # I need external assistance </unknown>" as locally correct: alpha_a when the cap refuses
        # the call, and a place in GAPG's Set 1. Under `answer_tags` and `plain` the answer stop
        # (`</answer>`) ends a completion before a marker can follow it; `plain` does not offer the
        # help option, but the help action and the marker still call the cloud there. In the routing
        # env `called_help` is the router's choice: a refused call falls back on the device's
        # completion, which keeps its answer unless it wrote the marker itself.
        gave_up = state.called_help or self.detector.untagged_call(text)
        local_correct = not gave_up and self.task.verify(problem, local_answer)
        used_cloud = budget.record(called_help)
        cloud_answer: str | None = None
        cloud_correct: bool | None = None
        if used_cloud:
            response = self.oracle.answer([problem])[0]
            cloud_answer = None if response.text is None else self.task.extract_answer(response.text)
            cloud_correct = self.task.verify(problem, cloud_answer)
        over_budget = called_help and not used_cloud
        reward = hierarchical_reward(
            self.reward,
            used_cloud=used_cloud,
            local_correct=local_correct,
            cloud_correct=cloud_correct,
            follows_format=self.task.template.follows_format(text),
        ) - budget.penalty(used_cloud)
        if over_budget:
            outcome = "over_budget"
        elif used_cloud:
            outcome = "cloud_correct" if cloud_correct else "wrong"
        else:
            outcome = "local_correct" if local_correct else "wrong"
        info = {
            "prompt_id": problem.id,
            "level": problem.level,
            "called_help": called_help,
            "called_cloud": used_cloud,
            "local_correct": local_correct,
            "cloud_correct": cloud_correct,
            "correct": bool(cloud_correct) if used_cloud else local_correct,
            "outcome": outcome,
            "local_answer": local_answer,
            "cloud_answer": cloud_answer,
            "budget": budget.snapshot(over_budget),
            "completion_tokens": len(state.ids),
            "stop_reason": stop or STOP_LENGTH,
        }
        return float(reward), info

    def prefetch(self, problems: list[Problem]) -> None:
        """Ask the cloud for several problems in one batch (e.g. a training group's help calls)."""
        unique = list({p.id: p for p in problems}.values())
        if unique:
            self.oracle.answer(unique)


__all__ = ["OUTCOMES", "STOP_HELP", "EpisodeScorer"]
