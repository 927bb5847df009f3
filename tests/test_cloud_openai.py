"""The `openai` oracle under fault injection, against a real HTTP server on 127.0.0.1.

The server is scripted per prompt (429 with Retry-After, 500s, a hang past the client timeout,
malformed JSON, an empty choices list, then recovery) and counts what it delivered, so the tests
can check retry counts, that no prompt is charged twice, that concurrency stays bounded, that the
cache keeps answers across a failure, and that the API key never leaks.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import SMALL_TASK

from collab_env.cloud import AnswerCache, cloud_config, make_oracle
from collab_env.cloud.openai_compat import _retry_after
from collab_env.cloud.settings import OpenAICloudConfig
from collab_env.cloud.vllm_engine import free_port
from collab_env.errors import CloudError, ConfigError
from collab_env.tasks import make_task

KEY = "sk-planted-SECRET-4b1d"
USAGE = {"prompt_tokens": 11, "completion_tokens": 7}


class ScriptedServer:
    """An OpenAI-compatible chat-completions server whose responses are scripted per prompt.

    `script[prompt]` lists the faults to serve before that prompt's answer ("429", "500", "500_echo",
    "401", "hang", "malformed", "empty"); once the list is empty it answers. It refuses requests past
    `max_requests` and ends a hang when stopped, so a test can neither loop nor wait forever.
    """

    def __init__(
        self,
        answers: dict[str, str],
        script: dict[str, list[str]] | None = None,
        delay_s: float = 0.0,
        max_requests: int = 200,
    ) -> None:
        self.answers = answers
        self.script = {prompt: list(faults) for prompt, faults in (script or {}).items()}
        self.delay_s = delay_s
        self.max_requests = max_requests
        self.requests: Counter[str] = Counter()
        self.completions: Counter[str] = Counter()
        """Answers delivered per prompt: what a paid API would charge."""
        self.times: dict[str, list[float]] = defaultdict(list)
        self.authorizations: set[str | None] = set()
        self.total = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def _next(self, prompt: str, authorization: str | None) -> str:
        with self.lock:
            self.total += 1
            if self.total > self.max_requests:
                return "refuse"
            self.requests[prompt] += 1
            self.times[prompt].append(time.monotonic())
            self.authorizations.add(authorization)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            faults = self.script.get(prompt)
            return faults.pop(0) if faults else "ok"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = request["messages"][-1]["content"]
                action = server._next(prompt, self.headers.get("Authorization"))
                if action == "refuse":
                    self._send(503, b'{"error": "request limit of the test server reached"}')
                    return
                try:
                    time.sleep(server.delay_s)
                    self._serve(action, prompt)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _serve(self, action: str, prompt: str) -> None:
                if action == "ok":
                    message = {"role": "assistant", "content": server.answers[prompt]}
                    body = {"id": "x", "choices": [{"index": 0, "message": message}], "usage": USAGE}
                    self._send(200, json.dumps(body).encode())
                    with server.lock:
                        server.completions[prompt] += 1
                elif action == "429":
                    self._send(429, b'{"error": "rate limited"}', {"Retry-After": "1"})
                elif action == "500":
                    self._send(500, b'{"error": "internal"}')
                elif action == "500_echo":  # a careless server that echoes request headers
                    self._send(
                        500, f"failed; your Authorization was {self.headers['Authorization']}".encode()
                    )
                elif action == "401":
                    self._send(401, b'{"error": "invalid api key"}')
                elif action == "malformed":
                    self._send(200, b'{"choices": [{"message": ')
                elif action == "empty":
                    self._send(200, json.dumps({"choices": [], "usage": USAGE}).encode())
                elif action == "hang":  # past the client's timeout, then drop the connection
                    server.stopping.wait(10.0)
                    self.close_connection = True

        return Handler

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def task():
    return make_task(SMALL_TASK)


@pytest.fixture
def serve(task) -> Iterator[Callable[..., ScriptedServer]]:
    """`serve(script=..., delay_s=...)`: a scripted server answering every problem of `task` correctly."""
    answers = {task.cloud_question(p): task.template.render_answer(p.answer) for p in task.problems("train")}
    answers |= {task.cloud_question(p): task.template.render_answer(p.answer) for p in task.problems("test")}
    servers: list[ScriptedServer] = []

    def start(**kwargs: Any) -> ScriptedServer:
        servers.append(ScriptedServer(answers, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def cloud(url: str, cache: Path, **overrides: Any) -> dict[str, Any]:
    """An openai cloud config with test-sized timeouts and backoff."""
    settings = {
        "name": "openai",
        "base_url": url,
        "model": "scripted",
        "cache_path": str(cache),
        "timeout_s": 0.5,
        "max_retries": 3,
        "backoff_base_s": 0.01,
        "backoff_max_s": 2.0,
        "max_concurrency": 2,
    }
    return settings | overrides


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def graded(task, problems, answers) -> list[bool]:
    return [task.verify(p, task.extract_answer(a.text)) for p, a in zip(problems, answers, strict=True)]


def test_every_fault_is_retried_and_each_prompt_is_charged_once(task, serve, tmp_path):
    problems = task.problems("train")[:5]
    q = [task.cloud_question(p) for p in problems]
    server = serve(script={q[0]: ["429"], q[1]: ["500", "500"], q[2]: ["hang"], q[3]: ["malformed", "empty"]})
    oracle = make_oracle(cloud(server.url, tmp_path / "c.sqlite"), task)

    answers = oracle.answer(problems)

    assert graded(task, problems, answers) == [True] * 5
    stats = oracle.stats
    assert (stats.calls, stats.retries, stats.errors) == (5, 6, 0)
    assert stats.extra["retry_reasons"] == {
        "http_429": 1,
        "http_500": 2,
        "timeout": 1,
        "invalid_json": 1,
        "no_choices": 1,
    }
    assert (stats.prompt_tokens, stats.completion_tokens) == (5 * 11, 5 * 7)
    assert [server.requests[x] for x in q] == [2, 3, 2, 3, 1]
    assert [server.completions[x] for x in q] == [1] * 5  # no prompt charged twice
    assert server.times[q[0]][1] - server.times[q[0]][0] >= 0.95  # Retry-After: 1 was honoured
    assert stats.latency_s >= 0.5  # the hang counted as time spent waiting for the server

    total = server.total
    again = make_oracle(cloud(server.url, tmp_path / "c.sqlite"), task)
    assert again.answer(problems) == answers
    assert (again.stats.calls, again.stats.cache_hits, server.total) == (0, 5, total)


def test_concurrency_is_bounded_and_answers_reach_the_calling_thread(task, serve, tmp_path):
    problems = task.problems("train")[:12]
    server = serve(delay_s=0.15)
    oracle = make_oracle(cloud(server.url, tmp_path / "c.sqlite", max_concurrency=3), task).oracle
    threads: list[str] = []
    order: list[int] = []

    def keep(index: int, answer: Any) -> None:
        threads.append(threading.current_thread().name)
        order.append(index)

    answers = oracle._answer(problems, keep)

    assert graded(task, problems, answers) == [True] * 12
    assert server.max_in_flight == 3
    assert sorted(order) == list(range(12))
    assert set(threads) == {threading.current_thread().name}


def test_answers_received_before_a_failure_stay_cached(task, serve, tmp_path):
    problems = task.problems("train")[:3]
    q = [task.cloud_question(p) for p in problems]
    cache = tmp_path / "c.sqlite"
    server = serve(script={q[1]: ["500"] * 10})
    oracle = make_oracle(cloud(server.url, cache, max_concurrency=1, max_retries=2), task)

    with pytest.raises(CloudError) as raised:
        oracle.answer(problems)

    message = str(raised.value)
    assert server.url in message and "HTTP 500" in message and "after 3 attempts" in message
    assert "1 answer(s) of this batch already received are kept in the answer cache" in message
    assert (oracle.stats.retries, oracle.stats.errors) == (2, 1)
    assert server.requests[q[2]] == 0  # nothing new was started after the failure
    assert len(AnswerCache(cache)) == 1

    healthy = serve()
    resumed = make_oracle(cloud(healthy.url, cache), task)
    assert graded(task, problems, resumed.answer(problems)) == [True] * 3
    assert healthy.requests == Counter({q[1]: 1, q[2]: 1})  # the first answer came from the cache


def test_a_server_down_for_good_raises_a_clear_error(task, tmp_path):
    url = dead_url()
    oracle = make_oracle(cloud(url, tmp_path / "c.sqlite", max_retries=2), task)
    started = time.monotonic()
    with pytest.raises(CloudError, match="connection failed") as raised:
        oracle.answer(task.problems("test")[:1])
    assert time.monotonic() - started < 5
    assert url in str(raised.value) and "after 3 attempts" in str(raised.value)
    assert oracle.stats.extra["retry_reasons"] == {"connection": 3} and oracle.stats.retries == 2


def test_score_wrong_grades_a_failed_call_as_wrong_in_a_real_episode(make_env, tmp_path):
    cache = tmp_path / "down.sqlite"
    env = make_env(cloud=cloud(dead_url(), cache, max_retries=1, on_error="score_wrong"))
    env.reset(seed=0, options={"prompt_id": 3})
    _, reward, terminated, _, info = env.step(env.unwrapped.help_action)

    assert terminated and info["called_cloud"] and info["outcome"] == "wrong"
    assert info["cloud_correct"] is False and info["cloud_answer"] is None and reward == 0.0
    assert env.unwrapped.cloud.stats.errors == 1
    assert len(AnswerCache(cache)) == 0  # a failure is not an answer: the next episode asks again
    env.reset(options={"prompt_id": 3})
    env.step(env.unwrapped.help_action)
    assert env.unwrapped.cloud.stats.calls == 2
    env.close()


def test_a_healthy_server_gives_cloud_correct_episodes(make_env, serve, tmp_path):
    server = serve(script={})
    env = make_env(cloud=cloud(server.url, tmp_path / "c.sqlite"))
    env.reset(seed=0, options={"prompt_id": 5})
    _, reward, _, _, info = env.step(env.unwrapped.help_action)
    assert info["outcome"] == "cloud_correct" and info["cloud_correct"] is True
    assert reward == pytest.approx(env.unwrapped.config.reward.alpha_c)
    assert sum(server.completions.values()) == 1
    env.close()


def test_the_api_key_never_leaks(task, serve, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("DEVICECLOUD_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    problems = task.problems("train")[:2]
    q = [task.cloud_question(p) for p in problems]
    server = serve(script={q[1]: ["500_echo"] * 10})
    cache = tmp_path / "c.sqlite"
    settings = cloud(server.url, cache, api_key_env="DEVICECLOUD_TEST_KEY", max_concurrency=1, max_retries=1)
    oracle = make_oracle(settings, task)

    with pytest.raises(CloudError) as raised:
        oracle.answer(problems)
    failed = make_oracle(settings | {"on_error": "score_wrong"}, task).answer(problems)

    assert server.authorizations == {f"Bearer {KEY}"}  # the key was sent...
    assert "[redacted]" in str(raised.value) and "[redacted]" in failed[1].error  # ...and echoed back
    assert "HTTP Request: POST" in caplog.text  # the client's logs were captured
    out, err = capsys.readouterr()
    cache_bytes = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(cache.name))
    assert len(AnswerCache(cache)) == 1 and q[0].encode() not in cache_bytes  # keys are hashes
    places = {
        "error": str(raised.value),
        "score_wrong error": failed[1].error,
        "config": repr(cloud_config(settings)),
        "oracle": repr(oracle.oracle),
        "identity": json.dumps(oracle.oracle.identity),
        "logs": caplog.text,
        "output": out + err,
    }
    assert [where for where, text in places.items() if KEY in text] == []
    assert KEY.encode() not in cache_bytes


def test_authentication_errors_raise_at_once_even_under_score_wrong(task, serve, tmp_path):
    problem = task.problems("train")[0]
    server = serve(script={task.cloud_question(problem): ["401"]})
    oracle = make_oracle(cloud(server.url, tmp_path / "c.sqlite", on_error="score_wrong"), task)
    with pytest.raises(CloudError, match="HTTP 401.*cloud.api_key_env"):
        oracle.answer([problem])
    assert server.total == 1 and oracle.stats.retries == 0


def test_a_missing_key_variable_fails_at_construction(task, tmp_path, monkeypatch, make_env):
    monkeypatch.delenv("DEVICECLOUD_ABSENT_KEY", raising=False)
    settings = cloud(dead_url(), tmp_path / "c.sqlite", api_key_env="DEVICECLOUD_ABSENT_KEY")
    with pytest.raises(ConfigError, match="environment variable DEVICECLOUD_ABSENT_KEY is not set"):
        make_oracle(settings, task)
    with pytest.raises(ConfigError, match="DEVICECLOUD_ABSENT_KEY"):
        make_env(cloud=settings)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"api_key_env": KEY}, "NAME of an environment variable"),
        ({"model": ""}, "cloud.model is empty"),
        ({"base_url": "127.0.0.1:8000/v1"}, "must start with http"),
        ({"on_error": "ignore"}, "cloud.on_error"),
        ({"backoff_max_s": 0.001}, "backoff_max_s=0.001 must be at least"),
        ({"max_concurrency": 0}, "cloud.max_concurrency=0 must be positive"),
    ],
)
def test_config_checks_name_the_field(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as raised:
        cloud_config(cloud("http://127.0.0.1:1/v1", tmp_path / "c.sqlite", **overrides))
    assert KEY not in str(raised.value)


def test_retry_after_takes_seconds_or_an_http_date():
    assert _retry_after("3") == 3.0 and _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < _retry_after(future) <= 30


def test_hydra_option_builds_the_openai_config():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from agents.registry import register_configs

    register_configs()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(overrides=["+cloud=openai", "cloud.model=smollm2", "cloud.max_concurrency=4"])
    built = OmegaConf.to_object(cfg.cloud)
    assert isinstance(built, OpenAICloudConfig)
    assert (built.model, built.max_concurrency, built.api_key_env, built.on_error) == (
        "smollm2",
        4,
        None,
        "raise",
    )
