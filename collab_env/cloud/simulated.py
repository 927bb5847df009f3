"""The embedded cloud: answers from the task's ground truth with a configurable accuracy."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from collab_env.cloud.base import AnswerCallback, CloudAnswer, CloudOracle
from collab_env.config import SimulatedCloudConfig
from collab_env.tasks import Problem


class SimulatedOracle(CloudOracle):
    """Correct with probability `accuracy`, decided deterministically per (seed, question).

    Answers are written in the task's template (e.g. `<answer>85</answer>`) so the same extractor
    and verifier grade them; wrong answers are plausible (a shifted number, a wrong expression).
    """

    config: SimulatedCloudConfig

    @property
    def identity(self) -> dict[str, Any]:
        return {
            **super().identity,
            "accuracy": self.config.accuracy,
            "seed": self.config.seed,
            "task": self.task.name,
        }

    def _rng(self, problem: Problem) -> random.Random:
        digest = hashlib.sha256(f"{self.config.seed}\x00{problem.question}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def _answer(self, problems: Sequence[Problem], on_answer: AnswerCallback) -> list[CloudAnswer]:
        answers = []
        for index, problem in enumerate(problems):
            rng = self._rng(problem)
            correct = rng.random() < self.config.accuracy
            value = problem.answer if correct else self.task.wrong_answer(problem, rng)
            answer = CloudAnswer(
                self.task.template.render_answer(value),
                prompt_tokens=len(self.request_text(problem)) // 4,
                completion_tokens=self.config.completion_tokens,
            )
            self.stats.calls += 1
            self.stats.prompt_tokens += answer.prompt_tokens
            self.stats.completion_tokens += answer.completion_tokens
            self.stats.latency_s += self.config.latency_s
            on_answer(index, answer)
            answers.append(answer)
        return answers
