"""What happens when a completion ends: the local answer is graded, a call for help goes through
the budget to the cloud, and the hierarchical reward is computed. `DeviceCloudEnv.step`,
`DeviceCloudEnv.score` and the vector env all end episodes here, so their rewards agree.
"""

from __future__ import annotations

from typing import Any

from collab_env.budget import CloudBudget
from collab_env.cloud import CachedOracle
from collab_env.config import RewardConfig
from collab_env.markers import STOP_HELP, STOP_LENGTH, CompletionState, MarkerDetector
from collab_env.rewards import hierarchical_reward
from collab_env.tasks import Problem, Task

OUTCOMES = ("local_correct", "cloud_correct", "wrong", "over_budget")


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
        (or past `max_new_tokens`) are ignored. Returns the state and why it stopped (None: it ran out)."""
        state = self.detector.start()
        for token in token_ids:
            token = int(token)
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
        local_correct = self.task.verify(problem, local_answer)
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
