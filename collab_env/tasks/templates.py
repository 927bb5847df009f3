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

STEP_SEPARATOR = " "
"""What a device that writes a trace puts between two worked steps."""


def render_trace(steps: list[str]) -> str:
    """A device's worked steps before its answer, as Template I puts reasoning: `<think>37+48=85 85-29=56</think>`."""
    return f"<think>{STEP_SEPARATOR.join(steps)}</think>"


def render_help_after(steps: list[str]) -> str:
    """The first steps of a trace, then the call-for-help marker instead of the rest (no steps: the
    marker right after `<think>`)."""
    return f"<think>{STEP_SEPARATOR.join(steps)} {HELP_MARKER}"


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_TAG = re.compile(r"<think>.*?</think>", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text`, with nested braces, or None.

    One pass pairs every brace first: cloud answers are untrusted text, and rescanning to the end for
    each unclosed "\\boxed{" took minutes on a 40 kB answer."""
    closing: dict[int, int] = {}
    opened: list[int] = []
    for i, char in enumerate(text):
        if char == "{":
            opened.append(i)
        elif char == "}" and opened:
            closing[opened.pop()] = i
    start = text.rfind("\\boxed")
    while start != -1:
        brace = start + len("\\boxed")
        while brace < len(text) and text[brace].isspace():
            brace += 1
        if brace in closing:
            return text[brace + 1 : closing[brace]].strip()
        start = text.rfind("\\boxed", 0, start)
    return None


def last_tagged(text: str, open_tag: str, close_tag: str) -> str | None:
    """Content of the last non-overlapping open_tag...close_tag pair (what re.findall with a lazy
    pattern finds last), in linear time: the regex retried every unclosed open tag to the end."""
    found = None
    position = 0
    while (start := text.find(open_tag, position)) != -1:
        end = text.find(close_tag, start + len(open_tag))
        if end == -1:
            break
        found = text[start + len(open_tag) : end]
        position = end + len(close_tag)
    return found


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
        found = last_tagged(text, "<answer>", "</answer>")
        return found.strip() if found is not None else None

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
