"""The `openai` oracle: any OpenAI-compatible chat-completions server, over httpx.

A real server fails in ordinary ways (rate limits, restarts, stalls, truncated bodies), so every
request is retried with exponential backoff and jitter on 429, 5xx, timeouts, connection errors,
malformed JSON and empty `choices`, honouring Retry-After. A batch runs `max_concurrency` requests
at once; each answer goes to the cache from the calling thread as soon as it arrives, so a run that
dies keeps what it paid for. The API key is read once from the environment variable the config
names and is kept out of configs, identities, the cache, logs and error messages.
"""

from __future__ import annotations

import email.utils
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from typing import Any

import httpx

from collab_env.cloud.base import AnswerCallback, CloudAnswer, CloudOracle
from collab_env.cloud.settings import OpenAICloudConfig
from collab_env.config import CloudConfig
from collab_env.errors import CloudError, ConfigError
from collab_env.tasks import Problem, Task

_FATAL_STATUS = {
    401: "check the key in the variable named by cloud.api_key_env",
    403: "check the key in the variable named by cloud.api_key_env",
    404: "check cloud.base_url (it should end in /v1) and cloud.model",
}
"""Set-up mistakes: retrying cannot help and scoring them wrong would hide them."""


class _Failed(Exception):
    """A request that got no answer; `fatal` ones stop the run even under on_error=score_wrong."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class _Skipped(Exception):
    """A request not sent because its batch is being stopped."""


class _Retry(Exception):
    """A transient failure: `reason` is counted in stats, `wait` is the server's Retry-After."""

    def __init__(self, reason: str, message: str, wait: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.wait = wait


def _retry_after(value: str | None) -> float | None:
    """Seconds asked for by a Retry-After header (delay-seconds or an HTTP date), None if absent."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _api_key(config: OpenAICloudConfig) -> str | None:
    """The key in the variable named by cloud.api_key_env (None without one); ConfigError if it is unset."""
    if config.api_key_env is None:
        return None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise ConfigError(
            f"cloud.api_key_env={config.api_key_env}: the environment variable {config.api_key_env} "
            "is not set or empty. Export the API key in it, or set cloud.api_key_env=null for a "
            "server without authentication."
        )
    return key


class OpenAIOracle(CloudOracle):
    """Chat completions from `{base_url}/chat/completions`, one request per problem."""

    config: OpenAICloudConfig

    def __init__(self, config: OpenAICloudConfig, task: Task) -> None:
        super().__init__(config, task)
        headers = {"Content-Type": "application/json"}
        self._secret = _api_key(config)
        if self._secret is not None:
            headers["Authorization"] = f"Bearer {self._secret}"
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(max_connections=config.max_concurrency),
        )
        self._lock = threading.Lock()
        self.stats.extra.update(retry_reasons={}, backoff_s=0.0)

    @classmethod
    def check_config(cls, config: CloudConfig) -> None:
        _api_key(config)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"OpenAIOracle(url={self.url!r}, model={self.config.model!r})"

    @property
    def identity(self) -> dict[str, Any]:
        return {
            **super().identity,
            "model": self.config.model,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }

    def _redact(self, text: str) -> str:
        """`text` with the API key blanked: a server may echo request headers in an error body."""
        return text.replace(self._secret, "[redacted]") if self._secret else text

    def _count(self, **increments: float) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with equal jitter: half the doubled delay fixed, half random."""
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _attempt(self, body: dict[str, Any]) -> CloudAnswer:
        """One HTTP request. Raises `_Retry` on a transient failure, `_Failed` when retrying cannot help."""
        start = time.monotonic()
        try:
            response = self._client.post(self.url, json=body)
        except httpx.TimeoutException as err:
            raise _Retry("timeout", f"no response within cloud.timeout_s={self.config.timeout_s}s") from err
        except httpx.TransportError as err:
            raise _Retry("connection", f"connection failed ({type(err).__name__}: {err})") from err
        finally:
            self._count(latency_s=time.monotonic() - start)
        status = response.status_code
        if status == 429 or status >= 500:
            wait = _retry_after(response.headers.get("Retry-After"))
            raise _Retry(f"http_{status}", f"HTTP {status}: {response.text[:200]!r}", wait)
        if status >= 400:
            hint = _FATAL_STATUS.get(status)
            detail = f"HTTP {status}: {response.text[:300]!r}"
            raise _Failed(f"{detail}; {hint}" if hint else detail, fatal=hint is not None)
        try:
            data = response.json()
        except ValueError as err:
            raise _Retry("invalid_json", f"malformed JSON in the response: {response.text[:200]!r}") from err
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            raise _Retry("no_choices", f"the response has no choices: {response.text[:200]!r}")
        message = choices[0].get("message") if isinstance(choices[0], dict) else None
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            raise _Retry("no_content", f"the first choice has no message content: {response.text[:200]!r}")
        usage = data.get("usage")
        usage = usage if isinstance(usage, dict) else {}  # optional: some servers leave it out

        def tokens(name: str) -> int:
            value = usage.get(name)
            return value if isinstance(value, int) else 0

        return CloudAnswer(
            text, prompt_tokens=tokens("prompt_tokens"), completion_tokens=tokens("completion_tokens")
        )

    def _request(self, problem: Problem, abort: threading.Event) -> CloudAnswer:
        """One answer with retries; raises `_Failed` once they are spent or `abort` is set.

        A failure that stops the batch sets `abort` here, in the worker, so that no queued request
        is sent before the calling thread has seen the failure.
        """
        if abort.is_set():
            raise _Skipped
        try:
            return self._retrying(problem, abort)
        except _Failed as err:
            if err.fatal or self.config.on_error == "raise":
                abort.set()
            raise

    def _retrying(self, problem: Problem, abort: threading.Event) -> CloudAnswer:
        messages = [{"role": "user", "content": self.request_text(problem)}]
        if self.config.system_prompt:
            messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        body = {
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        self._count(calls=1)
        for attempt in range(self.config.max_retries + 1):
            try:
                answer = self._attempt(body)
            except _Retry as retry:
                with self._lock:
                    reasons = self.stats.extra["retry_reasons"]
                    reasons[retry.reason] = reasons.get(retry.reason, 0) + 1
                last = retry
            else:
                self._count(prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens)
                return answer
            if attempt == self.config.max_retries:
                break
            wait = (
                min(last.wait, self.config.backoff_max_s) if last.wait is not None else self._backoff(attempt)
            )
            if abort.wait(wait):
                raise _Failed(f"{last} (stopped retrying: the batch is being stopped)")
            with self._lock:
                self.stats.retries += 1
                self.stats.extra["backoff_s"] += wait
        raise _Failed(f"{last} (after {self.config.max_retries + 1} attempts)")

    def _answer(self, problems: Sequence[Problem], on_answer: AnswerCallback) -> list[CloudAnswer]:
        answers: list[CloudAnswer | None] = [None] * len(problems)
        failure: _Failed | None = None
        abort = threading.Event()
        with ThreadPoolExecutor(min(self.config.max_concurrency, len(problems)), "openai-cloud") as pool:
            futures: dict[Future[CloudAnswer], int] = {
                pool.submit(self._request, problem, abort): index for index, problem in enumerate(problems)
            }

            def stop() -> None:
                """No new requests and no more retries; requests in flight finish and are kept."""
                abort.set()
                for future in futures:
                    future.cancel()

            try:
                for future in as_completed(futures):
                    if future.cancelled():
                        continue
                    index = futures[future]
                    try:
                        answer = future.result()
                    except _Skipped:
                        continue
                    except _Failed as err:
                        self._count(errors=1)
                        if err.fatal or self.config.on_error == "raise":
                            failure = failure or err
                            stop()
                            continue
                        answer = CloudAnswer(None, error=self._redact(str(err)))
                    answers[index] = answer
                    on_answer(index, answer)
            finally:
                stop()
        if failure is not None:
            kept = sum(a is not None for a in answers)
            raise CloudError(
                f"the cloud server at {self.config.base_url} failed: {self._redact(str(failure))}. "
                f"The {kept} answer(s) of this batch already received are kept in the answer cache "
                "(cloud.cache_path) and will not be asked again. Set cloud.on_error=score_wrong to grade "
                "failed calls as wrong answers instead of stopping."
            )
        return answers  # type: ignore[return-value]

    def close(self) -> None:
        self._client.close()
