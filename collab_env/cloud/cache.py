"""A persistent SQLite cache in front of every oracle: the cloud is asked at most once per request.

Each answer is committed in its own transaction as soon as it arrives, so a run that dies keeps
every answer it already paid for, and a rerun does not ask again. Failed answers are not cached.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from collab_env.cloud.base import CloudAnswer, CloudOracle, CloudStats
from collab_env.tasks import Problem

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    oracle TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL
)
"""


def storable(answer: CloudAnswer) -> CloudAnswer:
    """`answer` with lone surrogates replaced by "?".

    A server's JSON may escape one ("\\ud800"); SQLite stores UTF-8, which cannot hold it, so the
    cache write would fail. Cached and fresh answers go through here alike, so a rerun that reads
    the cache scores exactly what the first run scored."""
    if answer.text is None:
        return answer
    text = answer.text.encode("utf-8", "replace").decode("utf-8")
    return answer if text == answer.text else dataclasses.replace(answer, text=text)


class AnswerCache:
    """Answers keyed by (oracle identity, request), stored in SQLite (WAL journal, one commit per answer)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        with self._lock:
            if self.path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_SCHEMA)
            self._conn.commit()

    def get(self, key: str) -> CloudAnswer | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT text, prompt_tokens, completion_tokens FROM answers WHERE key = ?", (key,)
            ).fetchone()
        return CloudAnswer(row[0], row[1], row[2]) if row else None

    def put(self, key: str, oracle: str, answer: CloudAnswer) -> None:
        if answer.text is None:
            return
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                (key, oracle, answer.text, answer.prompt_tokens, answer.completion_tokens),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class CachedOracle:
    """An oracle behind the cache (and an in-memory memo). This is what environments hold."""

    def __init__(self, oracle: CloudOracle, cache: AnswerCache) -> None:
        self.oracle = oracle
        self.cache = cache
        self._memo: dict[str, CloudAnswer] = {}
        self.cache_hits = 0

    @property
    def stats(self) -> CloudStats:
        stats = self.oracle.stats
        stats.cache_hits = self.cache_hits
        return stats

    def answer(self, problems: Sequence[Problem]) -> list[CloudAnswer]:
        """Answers for `problems`; only the misses reach the oracle, batched, each cached as it comes."""
        keys = [self.oracle.cache_key(p) for p in problems]
        answers: list[CloudAnswer | None] = []
        missing: dict[str, int] = {}
        for i, key in enumerate(keys):
            found = self._memo.get(key) or self.cache.get(key)
            if found is not None:
                self._memo[key] = found
                self.cache_hits += 1
            elif key in missing:
                self.cache_hits += 1
            else:
                missing[key] = i
            answers.append(found)
        if missing:
            missing_keys = list(missing)
            name = self.oracle.config.name

            def keep(index: int, answer: CloudAnswer) -> None:
                answer = storable(answer)
                self.cache.put(missing_keys[index], name, answer)
                if answer.text is not None:
                    self._memo[missing_keys[index]] = answer

            fresh = [storable(a) for a in self.oracle._answer([problems[i] for i in missing.values()], keep)]
            by_key = dict(zip(missing_keys, fresh, strict=True))
            answers = [a if a is not None else by_key[k] for a, k in zip(answers, keys, strict=True)]
        return answers  # type: ignore[return-value]

    def close(self) -> None:
        self.oracle.close()
        self.cache.close()
