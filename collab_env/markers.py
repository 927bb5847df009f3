"""Finding where a completion ends: EOS, the call-for-help marker, or the end of the answer.

Detection is incremental and works on token ids first: the marker's token sequences (as the
tokenizer writes it after any character or after a space) are matched as a suffix of the
completion. A lenient text fallback (paper-spec section 1.3: the paper counts misspelt and
untagged markers as calls) looks at the decoded tail only when the new token contains '>', and
at the end of the episode for the untagged form.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from collab_env.tasks.templates import HELP_MARKER

_LENIENT_TAGGED = re.compile(
    r"<\s*unknown\s*>\s*i\s+need\s+(?:some\s+)?external\s+ass?is?s?t[ae]nce\s*\.?\s*<\s*/\s*unknown\s*>",
    re.IGNORECASE,
)
_LENIENT_UNTAGGED = re.compile(r"i\s+need\s+(?:some\s+)?external\s+ass?is?s?t[ae]nce\W*$", re.IGNORECASE)
_TAIL_CHARS = 96
_EOS_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>")

STOP_EOS, STOP_HELP, STOP_ANSWER, STOP_LENGTH = "eos", "help", "answer", "length"


@functools.lru_cache(maxsize=8)
def _vocabulary_text(tokenizer: Any) -> tuple[list[str], np.ndarray]:
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return texts, np.array([">" in t for t in texts], dtype=bool)


@functools.lru_cache(maxsize=8)
def _eos_ids(tokenizer: Any) -> frozenset[int]:
    # get_vocab() copies the whole vocabulary (about 0.25 s for SmolLM2's): once per tokenizer, not per env.
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in _EOS_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def marker_sequences(tokenizer: Any) -> list[list[int]]:
    """The token sequences of the marker as the tokenizer writes it after any character or after a space."""
    sequences = {
        tuple(tokenizer.encode(HELP_MARKER, add_special_tokens=False)),
        tuple(tokenizer.encode(" " + HELP_MARKER, add_special_tokens=False)),
    }
    return [list(s) for s in sorted(sequences)]


@dataclass(frozen=True)
class HelpBranch:
    """Where a completion decides to call for help: after `prefix`, the token `token` starts the marker.

    The prefix is the part of a marker sequence that an answer opening shares (`<` with `<answer>`), so
    the branch token is the first one that only the marker writes: its logit is the help action's. An
    empty prefix branches anywhere: for a device that writes a trace, ` <` after any step."""

    prefix: tuple[int, ...]
    token: int


def help_branches(tokenizer: Any, openings: tuple[str, ...]) -> list[HelpBranch]:
    """The branch of every marker sequence against the texts a completion may write instead of the
    marker where it could call (`EnvCore.help_openings`): it leaves the opening that shares most of it."""
    encoded = [tokenizer.encode(text, add_special_tokens=False) for text in openings]
    branches = []
    for sequence in marker_sequences(tokenizer):
        shared = max(_common_prefix(sequence, opening) for opening in encoded)
        branches.append(HelpBranch(tuple(sequence[:shared]), sequence[shared]))
    return list(dict.fromkeys(branches))


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    while length < min(len(a), len(b)) - 1 and a[length] == b[length]:
        length += 1
    return length


class MarkerDetector:
    """Per-tokenizer tables for ending a completion; `start()` gives the state of one completion."""

    def __init__(self, tokenizer: Any, stop_text: str | None, lenient: bool) -> None:
        self.tokenizer = tokenizer
        self.stop_text = stop_text
        self.lenient = lenient
        self.help_ids: list[int] = tokenizer.encode(HELP_MARKER, add_special_tokens=False)
        self.marker_sequences = marker_sequences(tokenizer)
        self.eos_ids = set(_eos_ids(tokenizer))
        self.token_text, self.has_close = _vocabulary_text(tokenizer)

    def start(self) -> CompletionState:
        return CompletionState(self)

    def untagged_call(self, text: str) -> bool:
        """The lenient end-of-episode check: the completion ends with 'I need external assistance'."""
        return self.lenient and bool(_LENIENT_UNTAGGED.search(text.strip()))


@dataclass
class CompletionState:
    """A growing completion. `feed` returns why it stopped (STOP_*) or None to continue."""

    detector: MarkerDetector
    ids: list[int] = field(default_factory=list)
    tail: str = ""
    called_help: bool = False

    def feed(self, token: int) -> str | None:
        d = self.detector
        if token in d.eos_ids:
            return STOP_EOS
        self.ids.append(token)
        text = d.token_text[token]
        self.tail = (self.tail + text)[-_TAIL_CHARS:]
        for seq in d.marker_sequences:
            if len(self.ids) >= len(seq) and self.ids[-len(seq) :] == seq:
                self.called_help = True
                return STOP_HELP
        if d.has_close[token]:
            if d.lenient and _LENIENT_TAGGED.search(self.tail):
                self.called_help = True
                return STOP_HELP
            if d.stop_text and d.stop_text in self.tail:
                return STOP_ANSWER
        return None

    def call_for_help(self) -> str:
        """The help action: write the marker and stop."""
        self.ids.extend(self.detector.help_ids)
        self.called_help = True
        return STOP_HELP
