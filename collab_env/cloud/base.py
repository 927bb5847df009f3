"""The interface every cloud oracle implements: a batch of problems in, answers and usage out."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from collab_env.config import CloudConfig
from collab_env.tasks import Problem, Task


class SharedModels:
    """Loaded cloud models (transformers models, vLLM engines) shared by every oracle of the same
    model in a process, such as a run's train and eval envs, and freed when the last one closes:
    a second vLLM engine would claim its share of the GPU again."""

    def __init__(self) -> None:
        self._entries: dict[Any, list[Any]] = {}

    def acquire(self, key: Any, load: Callable[[], Any]) -> Any:
        """The model under `key` (loaded by `load()` if no oracle holds it); pair with `release`."""
        entry = self._entries.setdefault(key, [None, 0])
        if entry[1] == 0:
            entry[0] = load()
        entry[1] += 1
        return entry[0]

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def release(self, key: Any) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._entries[key]


SHARED_MODELS = SharedModels()


@dataclass(frozen=True)
class CloudAnswer:
    """One cloud response. `text` is None when the oracle failed and `on_error` says to score it wrong."""

    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class CloudStats:
    """Counters kept by an oracle and reported by runs (never in the env's `info`)."""

    calls: int = 0
    """Answers requested from the backend (cache misses)."""
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    """Requests that failed after all retries."""
    retries: int = 0
    latency_s: float = 0.0
    """Total time spent waiting for the backend (simulated for the simulated oracle)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


AnswerCallback = Callable[[int, CloudAnswer], None]


class CloudOracle(ABC):
    """A fixed cloud model. Subclasses implement `_answer`; callers go through `CachedOracle`.

    The cloud sees the prompt only (paper-spec section 1.4): `task.cloud_question(problem)`,
    after an optional system prompt, never the device's attempt.
    """

    def __init__(self, config: CloudConfig, task: Task) -> None:
        self.config = config
        self.task = task
        self.stats = CloudStats()

    @classmethod
    def check_config(cls, config: CloudConfig) -> None:
        """Raise what the constructor would refuse, without building anything (no client, model or engine).

        Start-up checks call it before any weights are loaded; the default has nothing to check."""

    @property
    def identity(self) -> dict[str, Any]:
        """What makes two answers to the same request interchangeable (model, sampling settings).

        It keys the cache; secrets never go in it.
        """
        return {"name": self.config.name, "system_prompt": self.config.system_prompt}

    def request_text(self, problem: Problem) -> str:
        return self.task.cloud_question(problem)

    def cache_key(self, problem: Problem) -> str:
        payload = json.dumps({"oracle": self.identity, "request": self.request_text(problem)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    @abstractmethod
    def _answer(self, problems: Sequence[Problem], on_answer: AnswerCallback) -> list[CloudAnswer]:
        """Answers for `problems`, in order; updates `self.stats`.

        Calls `on_answer(index, answer)` as soon as each answer is known, so the cache keeps it
        even if a later request of the batch brings the run down.
        """

    def close(self) -> None:
        """Release servers, engines or threads held by the oracle."""


def model_fingerprint(path: Path) -> list[tuple[str, int, int]]:
    """Name, size and modification time of a local model directory's weight files: rebuilt weights
    at the same path are a different model, so their answers must not come from the cache of the old ones."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def chat_messages(oracle: CloudOracle, problem: Problem) -> list[dict[str, str]]:
    """The cloud's conversation: the optional system prompt, then the question alone."""
    messages = [{"role": "user", "content": oracle.request_text(problem)}]
    if oracle.config.system_prompt:
        messages.insert(0, {"role": "system", "content": oracle.config.system_prompt})
    return messages
