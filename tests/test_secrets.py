"""Secrets and unsafe input.

- An API key planted in an environment variable flows through a real training run (`python -m
  agents.train ... cloud=openai` against a local OpenAI-compatible server that checks it, answers
  with hostile text and sometimes fails with the key echoed in its error body) and appears nowhere
  afterwards: not in the run directory (Hydra's saved config, logs, metrics, samples, TensorBoard
  events, checkpoints, the answer cache and its WAL) nor in the run's output.
- Answers are graded without eval: the code has no eval, exec, pickle or torch.load, and Countdown
  and arithmetic answers that try code injection or huge powers are wrong, fast.
- Cloud responses are untrusted text: control characters, a lone surrogate, megabytes of repeated
  tags, SQL and config-interpolation injection neither break nor slow scoring, the cache or logs.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import re
import secrets
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import collab_env  # noqa: F401  (registers the environments)
from collab_env.cloud import AnswerCache
from collab_env.errors import DatasetError
from collab_env.tasks import make_task
from collab_env.tasks.expressions import UnsafeExpression, check_countdown, evaluate
from collab_env.tasks.files import MathJsonlTask, plausible_math
from collab_env.tasks.templates import TEMPLATES, last_boxed, last_tagged

REPO = Path(__file__).resolve().parents[1]
KEY_VAR = "DEVICECLOUD_TEST_SECRET_KEY"
HOSTILE = [
    "\x00\x1b[2J\x1b]0;pwned\x07<answer>1</answer>\r\n\x08\x7f",  # terminal control and title injection
    "<answer>" * 20_000,  # 160 kB of unclosed tags: quadratic extraction hung on this
    "\\boxed{" * 10_000 + "<answer>2</answer>",
    f"<answer>${{oc.env:{KEY_VAR}}}</answer>",  # would print the key if anything resolved it as config
    "<answer>'); DROP TABLE answers; --</answer>",
    "<answer>__import__('os').system('touch PWNED')</answer>",
    "<answer>9**9**9**9</answer>",
    "A" * 1_000_000,
    "lone surrogate \ud800 then <answer>3</answer>",  # sent as the JSON escape \\ud800
    "<answer>" + "(" * 5000 + "</answer>",
]


class HostileServer:
    """A chat-completions server on 127.0.0.1 (ephemeral port) that checks the bearer key and answers
    every prompt with one of HOSTILE (by the prompt's hash); with `echo_every`, every that-many-th
    request fails with HTTP 500 and the Authorization header in its body. It refuses requests past
    `max_requests` and shuts down by itself after `lifetime_s`."""

    def __init__(
        self, key: str, echo_every: int = 0, max_requests: int = 2000, lifetime_s: float = 900
    ) -> None:
        self.key, self.echo_every, self.max_requests = key, echo_every, max_requests
        self.requests = 0
        self.authorized: Counter[bool] = Counter()
        self.served: dict[str, str] = {}
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.watchdog = threading.Timer(lifetime_s, self.stop)
        self.watchdog.daemon = True
        self.watchdog.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1][
                    "content"
                ]
                authorization = self.headers.get("Authorization")
                with server.lock:
                    server.requests += 1
                    count = server.requests
                    server.authorized[authorization == f"Bearer {server.key}"] += 1
                if count > server.max_requests:
                    self._send(503, b'{"error": "request limit of the test server reached"}')
                elif server.echo_every and count % server.echo_every == 0:
                    self._send(
                        500, f"internal error; your request had Authorization: {authorization}".encode()
                    )
                else:
                    text = HOSTILE[sum(prompt.encode()) % len(HOSTILE)]
                    with server.lock:
                        server.served[prompt] = text
                    message = {"role": "assistant", "content": text}
                    body = {
                        "choices": [{"message": message}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                    }
                    self._send(200, json.dumps(body).encode())  # ensure_ascii: the surrogate goes as \\ud800

        return Handler

    def stop(self) -> None:
        self.watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def key() -> str:
    return f"sk-planted-{secrets.token_hex(12)}"


@pytest.fixture
def hostile(key: str) -> Iterator[HostileServer]:
    server = HostileServer(key, echo_every=7)
    yield server
    server.stop()


def files_containing(root: Path, needle: bytes) -> list[str]:
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()
    )


# ---------------------------------------------------------------------------------------------
# The key through a real run

_RUN = textwrap.dedent(
    """
    import runpy, sys
    import collab_env.scoring

    # The tiny random device model never asks for help on its own; here every completion does, so
    # that every prompt of the run reaches the cloud with the key.
    collab_env.scoring.EpisodeScorer.calls_help = lambda self, state: True
    sys.argv = ["agents.train", *sys.argv[1:]]
    runpy.run_module("agents.train", run_name="__main__", alter_sys=True)
    """
)


def _run_overrides(server: HostileServer, run_dir: Path) -> list[str]:
    return [
        "experiment=smoke", "train.steps=2", "agent=grpo", "cloud=openai", f"cloud.base_url={server.url}",
        "cloud.model=hostile", f"cloud.api_key_env={KEY_VAR}", "cloud.on_error=score_wrong", "cloud.max_retries=0",
        "cloud.timeout_s=30", f"cloud.cache_path={run_dir / 'cloud.sqlite'}",
    ]  # fmt: skip


def _check_run(run_dir: Path, output: str, key: str, server: HostileServer) -> None:
    assert (run_dir / "final_metrics.json").is_file() and (run_dir / "checkpoints").is_dir()
    # The key did flow: the server checked it on every request, and some requests failed with it echoed.
    assert server.authorized == Counter({True: server.requests}) and server.requests >= server.echo_every
    assert files_containing(run_dir, key.encode()) == []
    assert key not in output
    assert "\x1b]0;pwned" not in output  # cloud text never reaches the terminal or the logs
    with sqlite3.connect(run_dir / "cloud.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        texts = {row[0] for row in conn.execute("SELECT text FROM answers")}
    assert texts and texts <= {t.replace("\ud800", "?") for t in HOSTILE}
    metrics = json.loads((run_dir / "final_metrics.json").read_text())
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0


def test_the_api_key_appears_nowhere_after_a_training_run(key, hostile, tmp_path, monkeypatch, capfd, caplog):
    """In-process, through `agents.train.train`: checkpoints, metrics, samples, TensorBoard, cache, logs."""
    from hydra import compose, initialize_config_dir

    import agents.train
    import collab_env.scoring
    from agents.registry import register_configs

    monkeypatch.setenv(KEY_VAR, key)
    # The tiny random device model never asks for help on its own; here every completion does.
    monkeypatch.setattr(collab_env.scoring.EpisodeScorer, "calls_help", lambda self, state: True)
    caplog.set_level(logging.DEBUG)
    run_dir = tmp_path / "run"
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="train", overrides=_run_overrides(hostile, run_dir))
    agents.train.train(cfg, run_dir)
    out, err = capfd.readouterr()
    assert "HTTP Request: POST" in caplog.text  # the client's DEBUG logs were captured
    _check_run(run_dir, out + err + caplog.text, key, hostile)


@pytest.mark.slow
def test_the_api_key_appears_nowhere_after_a_command_line_run(key, hostile, tmp_path, monkeypatch):
    """`python -m agents.train`, adding Hydra's saved config and its log file (at DEBUG level)."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-c", _RUN, *_run_overrides(hostile, run_dir),
        f"hydra.run.dir={run_dir}", "hydra.job_logging.root.level=DEBUG",
    ]  # fmt: skip
    monkeypatch.setenv(KEY_VAR, key)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, errors="replace")
    assert done.returncode == 0, done.stderr[-3000:]
    assert KEY_VAR in (run_dir / ".hydra" / "config.yaml").read_text()  # the name is kept, not the value
    assert "HTTP Request: POST" in (run_dir / "train.log").read_text()
    _check_run(run_dir, done.stdout + done.stderr, key, hostile)


# ---------------------------------------------------------------------------------------------
# Untrusted cloud text through the env


def test_hostile_cloud_answers_cannot_break_scoring_or_the_cache(key, tmp_path, monkeypatch):
    server = HostileServer(key)
    monkeypatch.setenv(KEY_VAR, key)
    cache = tmp_path / "cloud.sqlite"
    cloud = {
        "name": "openai", "base_url": server.url, "model": "hostile", "api_key_env": KEY_VAR,
        "cache_path": str(cache), "timeout_s": 30, "max_retries": 0,
    }  # fmt: skip
    task = {"name": "arithmetic", "num_train": 40, "num_test": 20}
    try:
        infos = []
        for _ in range(2):  # the second env reads every answer from the cache
            env = gym.make("DeviceCloud-v0", task=task, cloud=cloud, render_mode="ansi")
            for prompt_id in range(len(HOSTILE) * 2):
                env.reset(options={"prompt_id": prompt_id})
                started = time.perf_counter()
                _, reward, terminated, _, info = env.step(env.unwrapped.help_action)
                assert time.perf_counter() - started < 2.0, info["cloud_answer"]
                assert terminated and info["called_cloud"] and reward in (0.0, 0.3)
                assert "\x1b" not in env.render()  # the rendering shows the device's side only
                infos.append(info)
            env.close()
        assert infos[: len(infos) // 2] == infos[len(infos) // 2 :]
        assert server.requests == len(HOSTILE) * 2  # each prompt asked once, across both envs
        assert {i["cloud_answer"] for i in infos} >= {
            "1",
            "'); DROP TABLE answers; --",
            f"${{oc.env:{KEY_VAR}}}",
        }
        assert not (REPO / "PWNED").exists() and not Path("PWNED").exists()
    finally:
        server.stop()
    with sqlite3.connect(cache) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert len(AnswerCache(cache)) == len(HOSTILE) * 2
    assert files_containing(tmp_path, key.encode()) == []


# ---------------------------------------------------------------------------------------------
# Answers are graded without eval


UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}
UNSAFE_ATTRIBUTES = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("torch", "load"),
    ("yaml", "load"),
    ("os", "system"),
}


def test_the_library_has_no_eval_exec_pickle_or_torch_load():
    found = []
    for path in sorted([*(REPO / "collab_env").rglob("*.py"), *(REPO / "agents").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id in UNSAFE_CALLS:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {func.id}")
            elif (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and (func.value.id, func.attr) in UNSAFE_ATTRIBUTES
            ):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {func.value.id}.{func.attr}")
    assert found == []


INJECTIONS = [
    "__import__('os').system('touch PWNED')",
    "().__class__.__mro__[1].__subclasses__()",
    "9**9**9",
    "9 ** 9 ** 9 ** 9",
    "10" + "0" * 5000,
    "(" * 100_000 + "1" + ")" * 100_000,
    "1" + "*9" * 5000,
    "1/0",
    "open('/etc/passwd').read()",
    "lambda: 0",
    "[x for x in range(10**10)]",
    "\x00\x1b[2J",
    "1e308*1e308",
]


@pytest.fixture(scope="module")
def graded_tasks(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    rows = tmp_path_factory.mktemp("countdown") / "c.jsonl"
    rows.write_text('{"nums": [3, 5, 7], "target": 22}\n{"nums": [2, 4, 6], "target": 48}\n')
    return [
        make_task({"name": "jsonl_countdown", "path": str(rows), "test_fraction": 0.5}),
        make_task({"name": "arithmetic", "num_train": 10, "num_test": 10}),
    ]


@pytest.mark.parametrize("answer", INJECTIONS, ids=range(len(INJECTIONS)))
def test_countdown_and_arithmetic_answers_are_never_code(answer, graded_tasks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    for task in graded_tasks:
        problem = task.problems("test")[0]
        assert task.verify(problem, answer) is False
        assert task.verify(problem, task.extract_answer(f"<answer>{answer}</answer>")) is False
    assert time.perf_counter() - started < 1.0
    assert list(tmp_path.iterdir()) == []  # nothing ran: no file was created


def _combine(
    left: tuple[str, Fraction | None], op: str, right: tuple[str, Fraction | None]
) -> tuple[str, Fraction | None]:
    a, b = left[1], right[1]
    if a is None or b is None or (op == "/" and b == 0):
        value = None  # a division by zero somewhere inside
    else:
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
    return f"({left[0]} {op} {right[0]})", value


# Expressions over small integers with their exact values, computed while they are built (None: x/0).
expressions = st.recursive(
    st.integers(0, 1000).map(lambda n: (str(n), Fraction(n))),
    lambda inner: (
        st.builds(_combine, inner, st.sampled_from("+-*/"), inner)
        | inner.map(lambda e: (f"-{e[0]}", None if e[1] is None else -e[1]))
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(expressions)
def test_the_countdown_evaluator_is_exact_on_arithmetic(expression):
    text, expected = expression
    try:
        value, numbers = evaluate(text)
    except UnsafeExpression:  # longer than 200 characters or 100 nodes: refused, never guessed
        assert len(text) > 200 or len(re.findall(r"\d+", text)) > 25
        return
    except ZeroDivisionError:
        assert expected is None
        return
    assert value == expected and numbers == [int(n) for n in re.findall(r"\d+", text)]


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(
    st.text(
        alphabet=st.sampled_from(list("0123456789+-*/() .eE_xjabc[]'\"=:,;!~^%&|<>@#$\\\n")), max_size=120
    )
)
def test_the_countdown_evaluator_refuses_garbage_quickly(text):
    started = time.perf_counter()
    with contextlib.suppress(UnsafeExpression, ZeroDivisionError):  # anything else fails the test
        evaluate(text)
    assert check_countdown(text, [1, 2, 3], 6) in (True, False)
    assert time.perf_counter() - started < 0.5


# ---------------------------------------------------------------------------------------------
# Answer extraction is linear and means what it meant


def _findall_last(text: str) -> str | None:
    """The specification: what the regex `<answer>(.*?)</answer>` finds last."""
    found = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return found[-1] if found else None


def _boxed_spec(text: str) -> str | None:
    """The specification of last_boxed, by the obvious rescanning algorithm (quadratic, small inputs)."""
    start = text.rfind("\\boxed")
    while start != -1:
        brace = start + len("\\boxed")
        while brace < len(text) and text[brace].isspace():
            brace += 1
        if brace < len(text) and text[brace] == "{":
            depth = 0
            for i in range(brace, len(text)):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                if depth == 0:
                    return text[brace + 1 : i].strip()
        start = text.rfind("\\boxed", 0, start)
    return None


@settings(max_examples=400, deadline=None, database=None, derandomize=True)
@given(
    st.lists(
        st.sampled_from(["<answer>", "</answer>", "\\boxed", "{", "}", " ", "7", "x", "<", ">"]), max_size=30
    )
)
def test_linear_extraction_agrees_with_its_specification(parts):
    text = "".join(parts)
    assert last_tagged(text, "<answer>", "</answer>") == _findall_last(text)
    assert last_boxed(text) == _boxed_spec(text)


@pytest.mark.parametrize("text", [HOSTILE[1] * 6, HOSTILE[2] * 12, "<answer>" + "x" * 2_000_000])
def test_extraction_of_megabytes_of_tags_is_fast(text):
    started = time.perf_counter()
    for template in TEMPLATES.values():
        template.extract_answer(text)
    last_boxed(text)
    assert time.perf_counter() - started < 5.0


# ---------------------------------------------------------------------------------------------
# Math answers (math-verify) from an untrusted source


SCREENED_MATH = [
    "9^{9^{9^{9}}}",
    "10^{10^{10}}",
    "2^{1000000000}",
    "(" * 40 + "1" + ")" * 40,
    "x" * 5000,
    "\x00\x1b[2J1",
]
"""Answers that would cost math-verify its full timeout (or that logs should not carry): refused unparsed."""
INJECTED_MATH = [
    "__import__('os').system('touch PWNED')",
    "\\boxed{__import__('os').system('touch PWNED')}",
    'x=exec(\'open("PWNED", "w")\')',
]
"""Answers that look like code: parsed as (wrong) math, never run."""


@pytest.fixture(scope="module")
def math_task(tmp_path_factory: pytest.TempPathFactory) -> MathJsonlTask:
    rows = tmp_path_factory.mktemp("math") / "m.jsonl"
    rows.write_text(
        "\n".join(
            json.dumps({"problem": f"What is {i}/2?", "solution": f"$\\boxed{{\\frac{{{i}}}{{2}}}}$"})
            for i in range(1, 5)
        )
    )
    return make_task({"name": "jsonl_math", "path": str(rows), "test_fraction": 0.5})


def test_hostile_math_answers_are_wrong_fast_and_never_run(math_task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problem = math_task.problems("test")[0]
    assert math_task.verify(problem, problem.answer)  # warms math-verify up, and the real answer still passes
    started = time.perf_counter()
    for answer in SCREENED_MATH:
        assert not plausible_math(answer)
        assert math_task.verify(problem, answer) is False
    assert time.perf_counter() - started < 0.5
    for answer in INJECTED_MATH:
        assert math_task.verify(problem, answer) is False
    assert list(tmp_path.iterdir()) == []


def test_a_math_ground_truth_that_cannot_be_parsed_is_an_error_naming_its_row(math_task, tmp_path):
    rows = tmp_path / "bad.jsonl"
    rows.write_text(
        json.dumps({"problem": "p1", "solution": "\\boxed{1}"})
        + "\n"
        + json.dumps({"problem": "p2", "answer": "$", "solution": "x"})
        + "\n"
    )
    task = make_task({"name": "jsonl_math", "path": str(rows), "test_fraction": 0.5})
    bad = next(p for p in task.problems("train") + task.problems("test") if p.answer == "$")
    with pytest.raises(DatasetError, match=rf"{re.escape(str(rows))}:2: math-verify cannot parse"):
        task.verify(bad, "1")
