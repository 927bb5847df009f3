"""The task interface: prompts with ids and splits, ground truth, answer extraction and a verifier."""

from __future__ import annotations

import operator
import random
import re
import reprlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from collab_env.config import SPLITS, TaskConfig
from collab_env.errors import ConfigError, DatasetError, DatasetWarning
from collab_env.tasks.templates import TEMPLATES, Template


@dataclass(frozen=True)
class Problem:
    """One prompt. `question` is what the cloud sees; `answer` is the ground truth as text."""

    id: int
    split: str
    question: str
    answer: str
    level: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RawProblem:
    """A problem before it has an id and a split (what a task source produces)."""

    question: str
    answer: str
    level: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)


_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?$")


def parse_number(text: str | None) -> Fraction | None:
    """A number written as an answer ('1,234', '-7', '2.5', '$3/4$', '12.') or None if it is not one."""
    if text is None:
        return None
    cleaned = text.strip().strip("$").replace(",", "").replace(" ", "").rstrip(".")
    if not cleaned or len(cleaned) > 64 or not _NUMBER.match(cleaned):
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


class Task(ABC):
    """A source of problems plus the rule that grades an answer.

    Subclasses implement `_generate` (training and test problems) and may override `verify`,
    `wrong_answer` and `equivalence_key`. The last `validation_fraction` of the training problems
    become the validation split. Prompt ids are unique across splits: train ids come first, then test
    ids, then validation ids.

    A problem whose ground truth fails the task's own check (`ground_truth_ok`: by default the
    verifier applied to the ground truth itself) is skipped: every answer to it would be graded
    wrong without a word. `skipped` counts them per split, and a DatasetWarning names the first.
    """

    name: str = ""

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.template: Template = TEMPLATES[config.template]
        generated = dict(zip(("train", "test"), self._generate(), strict=True))
        self.skipped: dict[str, int] = {}
        train, test = (self._checked(split, rows) for split, rows in generated.items())
        if not train or not test:
            skipped = f" after skipping {self.skipped}" if self.skipped else ""
            raise DatasetError(
                f"task {config.name!r} produced {len(train)} training and {len(test)} test problems{skipped}; "
                "both splits need at least one (check task.num_train, task.num_test and the data files)."
            )
        # At least one validation problem, and at least one left to train on (none from one problem);
        # no training problem is the same question as a validation one (`equivalence_key`).
        held_out = min(max(1, round(config.validation_fraction * len(train))), len(train) - 1)
        train, validation = train[: len(train) - held_out], train[len(train) - held_out :]
        validation_keys = {self.equivalence_key(self._unnumbered(row)) for row in validation}
        train = [row for row in train if self.equivalence_key(self._unnumbered(row)) not in validation_keys]
        self._problems: list[Problem] = []
        for split, rows in (("train", train), ("test", test), ("validation", validation)):
            for row in rows:
                self._problems.append(
                    Problem(len(self._problems), split, row.question, row.answer, row.level, row.data)
                )
        self._by_split = {split: [p for p in self._problems if p.split == split] for split in SPLITS}

    @abstractmethod
    def _generate(self) -> tuple[list[RawProblem], list[RawProblem]]:
        """The training and test problems, deterministic for the config's seed."""

    @staticmethod
    def _unnumbered(row: RawProblem, split: str = "") -> Problem:
        return Problem(-1, split, row.question, row.answer, row.level, row.data)

    def ground_truth_ok(self, problem: Problem) -> bool:
        """Whether `problem.answer` can be graded: here, the verifier accepts it as its own answer."""
        return self.verify(problem, problem.answer)

    def _checked(self, split: str, rows: list[RawProblem]) -> list[RawProblem]:
        kept, bad = [], []
        for row in rows:
            ok = self.ground_truth_ok(Problem(-1, split, row.question, row.answer, row.level, row.data))
            (kept if ok else bad).append(row)
        if bad:
            self.skipped[split] = len(bad)
            warnings.warn(
                DatasetWarning(
                    f"task {self.config.name!r}: skipped {len(bad)} of {len(rows)} {split} problems whose "
                    f"ground-truth answer fails the task's verifier (first: {reprlib.repr(bad[0].question)} "
                    f"with answer {reprlib.repr(bad[0].answer)}); no answer to them could be graded right."
                ),
                stacklevel=3,
            )
        return kept

    def problems(self, split: str) -> list[Problem]:
        if split not in self._by_split:
            raise ConfigError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}.")
        return self._by_split[split]

    def equivalence_key(self, problem: Problem) -> Any:
        """What makes two problems the same question (here: the question text, whitespace and case
        aside); tasks whose questions have equivalent forms (a + b and b + a) say so."""
        return " ".join(problem.question.split()).lower()

    def overlap(self) -> dict[str, int]:
        """Problems of one split that are the same question (`equivalence_key`) as one of another split,
        for each pair of splits; all 0 for the generated tasks."""
        keys = {
            split: {self.equivalence_key(p) for p in problems} for split, problems in self._by_split.items()
        }
        pairs = (("train", "validation"), ("train", "test"), ("validation", "test"))
        return {f"{a}_{b}": len(keys[a] & keys[b]) for a, b in pairs}

    def problem(self, prompt_id: int) -> Problem:
        """The problem with this id; anything but an integer id of this task is a ConfigError.

        Floats, strings and booleans are refused rather than converted: int(2.7) or int(True) would
        silently pick another prompt than the caller meant."""
        try:
            index = -1 if isinstance(prompt_id, bool) else operator.index(prompt_id)
        except TypeError:
            index = -1
        if not 0 <= index < len(self._problems):
            raise ConfigError(
                f"prompt_id={reprlib.repr(prompt_id)} does not exist: task {self.name!r} has integer ids "
                f"0..{len(self._problems) - 1} (train 0..{len(self._by_split['train']) - 1}, then test, then "
                "validation)."
            )
        return self._problems[index]

    def __len__(self) -> int:
        return len(self._problems)

    @property
    def levels(self) -> list[str]:
        """Difficulty levels present in the problems, in order of first appearance."""
        return list(dict.fromkeys(p.level for p in self._problems))

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """The device model's chat messages for `problem`."""
        return self.template.messages(problem.question, self.config.max_steps)

    def cloud_question(self, problem: Problem) -> str:
        """What a real cloud model is asked: the question alone plus the answer-format sentence."""
        return f"{problem.question}\n{self.template.cloud_instruction}"

    def extract_answer(self, text: str) -> str | None:
        return self.template.extract_answer(text)

    def verify(self, problem: Problem, answer: str | None) -> bool:
        """Binary verifier. The default compares numbers exactly (1,000 = 1000 = 1000.0)."""
        given, truth = parse_number(answer), parse_number(problem.answer)
        return given is not None and truth is not None and given == truth

    def worked_steps(self, problem: Problem) -> list[str]:
        """The solution written step by step, for a device recipe that learns to reason before it answers
        (`device.recipe.trace`); empty for tasks that have none."""
        return []

    def wrong_answer(self, problem: Problem, rng: random.Random) -> str:
        """A plausible wrong answer (used by the simulated cloud); numeric tasks shift the truth."""
        truth = parse_number(problem.answer)
        if truth is None:
            return "no answer"
        shift = rng.choice([-10, -2, -1, 1, 2, 10])
        wrong = truth + shift
        return str(int(wrong)) if wrong.denominator == 1 else str(float(wrong))


def split_unique(
    rows: list[RawProblem], num_train: int, num_test: int
) -> tuple[list[RawProblem], list[RawProblem]]:
    """First `num_train` distinct questions for training, the next `num_test` distinct ones for test."""
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row.question not in seen:
            seen.add(row.question)
            unique.append(row)
    return unique[:num_train], unique[num_train : num_train + num_test]
