"""Prompt templates: how a question is put to the device model and where its answer is found.

Two templates follow the paper's (paper-spec section 2), in our own words:

- `answer_tags` (Template I): reasoning in <think> tags, the answer in <answer> tags, and the
  option to end with the call-for-help marker instead.
- `numbered_steps` (Template II): numbered steps, the answer in \\boxed{}, and the instruction to
  give up with the marker after a given number of steps.
- `plain`: Template I without the help option (the task-tuning-only baseline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HELP_MARKER = "<unknown> I need external assistance </unknown>"

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_TAG = re.compile(r"<think>.*?</think>", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text`, with nested braces, or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        brace = text.find("{", start)
        if brace != -1 and text[start + len("\\boxed") : brace].strip() == "":
            depth = 0
            for i in range(brace, len(text)):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[brace + 1 : i].strip()
        start = text.rfind("\\boxed", 0, start)
    return None


@dataclass(frozen=True)
class Template:
    """A prompt template. `stop_text` ends generation as soon as it appears (the answer is complete)."""

    name: str
    allows_help: bool
    stop_text: str | None

    def messages(self, question: str, max_steps: int = 6) -> list[dict[str, str]]:
        """Chat messages (system + user) for `question`."""
        if self.name == "numbered_steps":
            system = (
                "You are given a math problem. Work through it in numbered steps, written as "
                "Step 1: ..., Step 2: ..., and so on, and put the final answer inside \\boxed{}. "
                f"If you have not solved the problem after {max_steps} steps, stop and reply with "
                f"exactly: {HELP_MARKER}"
            )
            return [
                {"role": "system", "content": system},
                {"role": "user", "content": f"{question} Let's think step by step."},
            ]
        system = (
            "You are a careful assistant. Reason about the problem inside <think> </think> tags, "
            "then write the final answer inside <answer> </answer> tags."
        )
        if self.allows_help:
            system += (
                " If you cannot find the answer by your own reasoning, you may instead end your reply "
                f"with exactly: {HELP_MARKER}"
            )
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": f"{question} Let me solve this step by step."},
        ]

    def extract_answer(self, text: str) -> str | None:
        """The final answer written in `text`, or None when there is none."""
        if self.name == "numbered_steps":
            return last_boxed(text)
        found = _ANSWER_TAG.findall(text)
        return found[-1].strip() if found else None

    def render_answer(self, answer: str) -> str:
        """A short completion that states `answer` in this template's format."""
        if self.name == "numbered_steps":
            return f"Step 1: The answer is \\boxed{{{answer}}}."
        return f"<answer>{answer}</answer>"

    def follows_format(self, text: str) -> bool:
        """The v1 format check: reasoning in <think> tags and the answer in <answer> tags."""
        if self.name == "numbered_steps":
            return "Step 1" in text and last_boxed(text) is not None
        return bool(_THINK_TAG.search(text)) and bool(_ANSWER_TAG.search(text))

    @property
    def cloud_instruction(self) -> str:
        """Sentence appended to the question sent to a real cloud model, so its answer can be graded."""
        if self.name == "numbered_steps":
            return "Put the final answer inside \\boxed{}."
        return "Give the final answer inside <answer> </answer> tags."


TEMPLATES = {
    "answer_tags": Template("answer_tags", allows_help=True, stop_text="</answer>"),
    "numbered_steps": Template("numbered_steps", allows_help=True, stop_text=None),
    "plain": Template("plain", allows_help=False, stop_text="</answer>"),
}
