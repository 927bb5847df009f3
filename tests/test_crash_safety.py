"""Crash safety: a process killed with SIGKILL at any point loses at most the work in flight.

- The cloud answer cache (SQLite, WAL): writers are killed at random moments, alone and beside a
  second writer on the same file; the file stays intact, every answer whose on_answer callback ran
  is there, and a later run never asks the cloud again for a cached prompt.
- Checkpoints: a writer is killed inside each stage of a save (half-written policy or optimizer
  file, half-written state.json, before the rename, while an old checkpoint is deleted) and at
  random moments; every checkpoint that is listed loads, the newest loses at most the step being
  saved, and the next save removes the leftovers.
- Training (slow): `python -m agents.train experiment=smoke` is killed during rollout, update and
  checkpoint writes and at random moments, then resumed by the same command; it ends with exactly
  the parameters and metrics of a run that was never killed.

Kill points are injected by wrapper scripts that patch the library in the killed process only.
Each test records how many kills it made (junit properties).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from agents.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from collab_env.cloud import AnswerCache, CachedOracle
from collab_env.cloud.simulated import SimulatedOracle
from collab_env.config import SimulatedCloudConfig
from collab_env.tasks import make_task

REPO = Path(__file__).resolve().parents[1]
# One intra-op thread: with two, float reductions differ between processes in the 7th digit, and a
# resumed run could not be compared bit for bit with one that was never killed.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CACHE_TASK = {"name": "arithmetic", "num_train": 600, "num_test": 10}


def wait_until_ready(process: subprocess.Popen[str]) -> None:
    """Block until the child prints its first line ("ready"); fail if it exits first."""
    line = process.stdout.readline() if process.stdout else ""
    assert line == "ready\n", (
        f"the child exited ({process.wait()}): {process.stderr.read() if process.stderr else ''}"
    )


def kill(process: subprocess.Popen[str]) -> list[str]:
    """SIGKILL the child; return every line it printed."""
    process.send_signal(signal.SIGKILL)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, process.returncode
    return out.splitlines()


# ---------------------------------------------------------------------------------------------
# The cloud answer cache

_CACHE_WRITER = textwrap.dedent(
    """
    import hashlib, json, sys
    from collab_env.cloud import AnswerCache, CachedOracle
    from collab_env.cloud.base import CloudAnswer
    from collab_env.cloud.simulated import SimulatedOracle
    from collab_env.config import SimulatedCloudConfig
    from collab_env.tasks import make_task

    path, task, order = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]

    class Padded(SimulatedOracle):
        # Long answers (8 kB, control characters included) so that a kill often lands inside a write.
        def _answer(self, problems, on_answer):
            def pad(answer, problem):
                junk = hashlib.sha256(problem.question.encode()).hexdigest() * 128
                return CloudAnswer(answer.text + "\\x00\\x1b[2J" + junk, answer.prompt_tokens, answer.completion_tokens)
            plain = super()._answer(problems, lambda i, a: on_answer(i, pad(a, problems[i])))
            return [pad(a, p) for a, p in zip(plain, problems)]

    task = make_task(task)
    oracle = CachedOracle(Padded(SimulatedCloudConfig(cache_path=path), task), AnswerCache(path))
    problems = task.problems("train")
    print("ready", flush=True)
    for problem in problems if order == "forward" else problems[::-1]:
        before = oracle.oracle.stats.calls
        (answer,) = oracle.answer([problem])
        # Printed only after answer() returned, i.e. after on_answer committed it to the cache.
        kind = "new" if oracle.oracle.stats.calls > before else "hit"
        print(kind, oracle.oracle.cache_key(problem), hashlib.sha256(answer.text.encode()).hexdigest(), flush=True)
    print("done", flush=True)
    """
)


def cache_writer(path: Path, order: str = "forward") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CACHE_WRITER, str(path), json.dumps(CACHE_TASK), order],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def confirmed(lines: list[str]) -> dict[str, tuple[str, str]]:
    """key -> (new or hit, sha256 of the answer) for every answer the writer reported."""
    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("new", "hit"):
            out[parts[1]] = (parts[0], parts[2])
    return out


def check_cache(path: Path, reported: dict[str, str]) -> None:
    """The file is intact and holds every reported answer, which a new run reads without asking again."""
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    cache = AnswerCache(path)
    for key, digest in reported.items():
        answer = cache.get(key)
        assert answer is not None, f"answer {key} was reported cached but is missing"
        assert hashlib.sha256(answer.text.encode()).hexdigest() == digest
    task = make_task(CACHE_TASK)
    oracle = CachedOracle(SimulatedOracle(SimulatedCloudConfig(cache_path=str(path)), task), cache)
    by_key = {oracle.oracle.cache_key(p): p for p in task.problems("train")}
    oracle.answer([by_key[key] for key in reported])
    assert oracle.stats.calls == 0 and oracle.stats.cache_hits == len(reported)
    oracle.close()


def test_cache_survives_kills_and_never_asks_twice(tmp_path, record_testsuite_property):
    path = tmp_path / "cloud.sqlite"
    rng = random.Random(20240611)
    reported: dict[str, str] = {}
    kills = 0
    for round_ in range(6):
        # The second writer on the same file (reading from the other end) must not be disturbed.
        other = cache_writer(path, "backward") if round_ % 2 else None
        writer = cache_writer(path)
        wait_until_ready(writer)
        time.sleep(rng.uniform(0.0, 1.5))
        lines = confirmed(kill(writer))
        kills += 1
        for key, (kind, digest) in lines.items():
            if key in reported:  # confirmed by an earlier, killed writer: it must come from the cache
                assert kind == "hit" and digest == reported[key], key
            reported[key] = digest
        if other is not None:
            out, err = other.communicate(timeout=600)
            assert other.returncode == 0, err
            assert out.splitlines()[-1] == "done"
            for key, (_, digest) in confirmed(out.splitlines()).items():
                assert key not in reported or digest == reported[key]
                reported[key] = digest
        check_cache(path, reported)
    record_testsuite_property("cache.kills", kills)
    record_testsuite_property("cache.answers_checked", len(reported))
    assert kills == 6 and len(reported) > 0


# ---------------------------------------------------------------------------------------------
# Checkpoint writes

_CHECKPOINT_WRITER = textwrap.dedent(
    """
    import json, os, pathlib, random, shutil, signal, sys, time
    import torch

    torch.set_num_threads(1)  # no thread pools in a process that forks
    import agents.checkpoint as ckpt

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(4, 256)).sum().backward()
        optimizer.step()
        return model, optimizer

    def inject(phase, fault_step):
        state = {"step": 0}
        real_save, real_replace, real_rmtree = ckpt.save_file, os.replace, shutil.rmtree
        real_write = pathlib.Path.write_text

        def save_file(tensors, path):
            real_save(tensors, path)
            if state["step"] == fault_step and path.endswith(phase + ".safetensors"):
                size = os.path.getsize(path)
                with open(path, "r+b") as handle:
                    handle.truncate(size // 2)  # the writer died half-way through this file
                die()

        def write_text(self, text, *args, **kwargs):
            if state["step"] == fault_step and phase == "state" and self.name == "state.json":
                real_write(self, text[: len(text) // 2], *args, **kwargs)
                die()
            return real_write(self, text, *args, **kwargs)

        def replace(src, dst):
            if state["step"] == fault_step and phase == "rename" and ".tmp-" in str(src):
                die()
            return real_replace(src, dst)

        def rmtree(path, *args, **kwargs):
            if phase == "prune" and "step_000001" in str(path) and ".tmp-" not in str(path):
                os.remove(os.path.join(path, "policy.safetensors"))  # rmtree got this far
                die()
            return real_rmtree(path, *args, **kwargs)

        ckpt.save_file, os.replace, shutil.rmtree = save_file, replace, rmtree
        pathlib.Path.write_text = write_text
        return state

    def save_steps(run_dir, model, optimizer, state, steps):
        for step in steps:
            state["step"] = step
            ckpt.save_checkpoint(run_dir, step, model, optimizer, None, {"config": {}}, keep_last=2)

    def phase_kills(root, model, optimizer):
        # A kill inside each stage of a save of step 3, each in a directory of its own.
        report = []
        for phase in ["policy", "optimizer", "state", "rename", "prune"]:
            pid = os.fork()
            if pid == 0:
                save_steps(root / phase, model, optimizer, inject(phase, 3), range(1, 5))
                os._exit(0)  # the fault never fired
            _, status = os.waitpid(pid, 0)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            report.append({"phase": phase, "killed": killed})
        return report

    def random_kills(root, model, optimizer, rng, kills):
        # Kills at random moments of a run saving in a loop, resumed from its newest checkpoint each time.
        report = []
        for _ in range(kills):
            pid = os.fork()
            if pid == 0:
                found = ckpt.list_checkpoints(root)
                save_steps(root, model, optimizer, {}, range(int(found[-1].name[5:]) + 1 if found else 1, 10**9))
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            fresh, fresh_optimizer = build()
            listed = ckpt.list_checkpoints(root)
            loads = []
            for path in listed:
                try:
                    ckpt.load_checkpoint(path, fresh, fresh_optimizer, None)
                    loads.append(True)
                except Exception as err:
                    loads.append(repr(err))
            leftovers = sorted(p.name for p in (root / "checkpoints").glob(".*"))
            report.append({"listed": [p.name for p in listed], "loads": loads, "leftovers": leftovers})
        return report

    model, optimizer = build()
    root, seed, kills = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    report = {
        "phases": phase_kills(root, model, optimizer),
        "random": random_kills(root / "random", model, optimizer, random.Random(seed), kills),
    }
    print(json.dumps(report))
    """
)


RANDOM_KILLS = 12


@pytest.fixture(scope="module")
def checkpoint_kills(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One child process (torch imported once) whose forks are killed while saving checkpoints."""
    root = tmp_path_factory.mktemp("checkpoints")
    done = subprocess.run(
        [sys.executable, "-c", _CHECKPOINT_WRITER, str(root), "7", str(RANDOM_KILLS)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return root, json.loads(done.stdout.strip().splitlines()[-1])


def _module_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_a_killed_checkpoint_write_is_never_loaded(checkpoint_kills, record_testsuite_property):
    root, report = checkpoint_kills
    phases = [r["phase"] for r in report["phases"] if r["killed"]]
    assert phases == ["policy", "optimizer", "state", "rename", "prune"]
    for phase in phases:
        run_dir = root / phase
        listed = [p.name for p in list_checkpoints(run_dir)]
        # Killed while saving step 3: step 3 counts only if its rename happened (prune runs after it).
        assert listed == (
            ["step_000002", "step_000003"] if phase == "prune" else ["step_000001", "step_000002"]
        )
        for path in list_checkpoints(run_dir):
            model, optimizer = _module_and_optimizer()
            assert load_checkpoint(path, model, optimizer, None)["step"] == int(path.name[5:])
        assert any(p.name.startswith(".step_") for p in (run_dir / "checkpoints").iterdir()), phase
        # The resumed run saves again: the leftovers go, the listing is the newest two.
        model, optimizer = _module_and_optimizer()
        save_checkpoint(run_dir, 4, model, optimizer, None, {"config": {}}, keep_last=2)
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == listed[-1:] + ["step_000004"]
    record_testsuite_property("checkpoint.phase_kills", len(phases))


def test_checkpoints_survive_random_kills(checkpoint_kills, record_testsuite_property):
    report = checkpoint_kills[1]["random"]
    assert len(report) == RANDOM_KILLS
    for entry in report:
        assert all(ok is True for ok in entry["loads"]), entry
        assert len(entry["listed"]) <= 3  # keep_last=2, plus the newest while the oldest is removed
    assert report[-1]["listed"], "no checkpoint was ever completed"
    record_testsuite_property("checkpoint.random_kills", RANDOM_KILLS)
    record_testsuite_property("checkpoint.kills_with_leftovers", sum(bool(e["leftovers"]) for e in report))


def test_an_unreadable_checkpoint_is_a_clear_error(tmp_path):
    model, optimizer = _module_and_optimizer()
    path = save_checkpoint(tmp_path, 1, model, optimizer, None, {"config": {}}, keep_last=2)
    for name in ("policy.safetensors", "optimizer.safetensors", "state.json"):
        saved = (path / name).read_bytes()
        (path / name).write_bytes(saved[: len(saved) // 3])
        with pytest.raises(CheckpointError, match="unreadable.*delete it to resume from an earlier one"):
            load_checkpoint(path, model, optimizer, None)
        (path / name).write_bytes(saved)


# ---------------------------------------------------------------------------------------------
# Training runs (slow)

_TRAIN = textwrap.dedent(
    """
    import os, pathlib, runpy, shutil, signal, sys
    import torch
    import agents.checkpoint, agents.trainer, collab_env.scoring

    phase, fault_step = os.environ.get("DC_KILL", "none:0").split(":")
    fault_step = int(fault_step)
    now = {"step": 0, "scored": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    real_step = agents.trainer.Trainer.step
    def step(self, number, log):
        now["step"] = number
        return real_step(self, number, log)
    agents.trainer.Trainer.step = step

    if phase == "rollout":  # part of the rollout scored, some cloud answers cached
        real_finish = collab_env.scoring.EpisodeScorer.finish_routed
        def finish_routed(self, *args, **kwargs):
            now["scored"] += now["step"] == fault_step
            if now["scored"] == 5:
                die()
            return real_finish(self, *args, **kwargs)
        collab_env.scoring.EpisodeScorer.finish_routed = finish_routed
    elif phase == "update":  # gradients computed, the optimizer step not taken
        real_clip = torch.nn.utils.clip_grad_norm_
        def clip(*args, **kwargs):
            if now["step"] == fault_step:
                die()
            return real_clip(*args, **kwargs)
        torch.nn.utils.clip_grad_norm_ = clip
    elif phase == "checkpoint":  # half of optimizer.safetensors written
        real_save = agents.checkpoint.save_file
        def save_file(tensors, path):
            real_save(tensors, path)
            if now["step"] == fault_step and path.endswith("optimizer.safetensors"):
                with open(path, "r+b") as handle:
                    handle.truncate(os.path.getsize(path) // 2)
                die()
        agents.checkpoint.save_file = save_file
    elif phase in ("rename", "prune"):  # before the checkpoint's rename; while an old one is deleted
        real_replace, real_rmtree = os.replace, shutil.rmtree
        def replace(src, dst):
            if phase == "rename" and now["step"] == fault_step and ".tmp-" in str(src):
                die()
            return real_replace(src, dst)
        def rmtree(path, *args, **kwargs):
            if phase == "prune" and now["step"] == fault_step and ".del-" in str(path):
                die()
            return real_rmtree(path, *args, **kwargs)
        os.replace, shutil.rmtree = replace, rmtree

    sys.argv = ["agents.train", *sys.argv[1:]]
    runpy.run_module("agents.train", run_name="__main__", alter_sys=True)
    """
)
STEPS = 8


def train_command(run_dir: Path) -> list[str]:
    # PPO (value head, entropy, two epochs: a rich optimizer state) in one minibatch: with several,
    # agents/trainer.py does not restore its shuffling generator and a resumed run diverges.
    return [
        sys.executable, "-c", _TRAIN, "experiment=smoke", "agent=ppo", "agent.minibatches=1", "agent.ent_coef=0.05",
        f"train.steps={STEPS}", "train.save_every=1", "train.keep_last=2",
        f"cloud.cache_path={run_dir / 'cloud.sqlite'}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def check_after_kill(run_dir: Path, in_flight: int | None) -> int:
    """Invariants of a run directory after a kill; returns the newest checkpoint's step."""
    listed = list_checkpoints(run_dir)
    newest = int(listed[-1].name[5:]) if listed else 0
    if in_flight is not None:
        assert newest >= in_flight - 1, f"killed in step {in_flight}, but the newest checkpoint is {newest}"
    for path in listed:
        for name in ("policy.safetensors", "optimizer.safetensors"):
            load_file(str(path / name))  # complete files (a partial one fails to parse)
        assert json.loads((path / "state.json").read_text())["step"] == int(path.name[5:])
    steps = [int(row["step"]) for row in metrics_rows(run_dir)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) <= newest + 1, (steps, newest)
    cache = run_dir / "cloud.sqlite"
    if cache.exists():
        with sqlite3.connect(cache) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    return newest


@pytest.mark.slow
def test_training_killed_anywhere_resumes_to_the_same_result(tmp_path, record_testsuite_property):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(train_command(straight), cwd=REPO, env=ENV, check=True, capture_output=True, timeout=900)
    # Kills inside given stages of given steps, then at random moments of the steps left.
    plan = [
        ("rollout", 2),
        ("update", 3),
        ("checkpoint", 3),
        ("rename", 4),
        ("prune", 4),
        ("random", 0),
        ("random", 0),
    ]
    rng = random.Random(11)
    kills, finished = 0, False
    for phase, fault_step in plan:
        process = subprocess.Popen(
            train_command(killed),
            cwd=REPO,
            env={**ENV, "DC_KILL": f"{phase}:{fault_step}"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if phase == "random":  # a random moment once this launch has finished a step
            logged = len(metrics_rows(killed))
            while len(metrics_rows(killed)) <= logged and process.poll() is None:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 2.0))
            process.send_signal(signal.SIGKILL)
        _, err = process.communicate(timeout=900)
        if process.returncode == 0 or (killed / "final_metrics.json").exists():
            assert phase == "random", err  # only a random kill can come after the run's end
            finished = True
            break
        assert process.returncode == -signal.SIGKILL, (phase, process.returncode, err)
        kills += 1
        check_after_kill(killed, None if phase == "random" else fault_step)
    if not finished:
        subprocess.run(train_command(killed), cwd=REPO, env=ENV, check=True, capture_output=True, timeout=900)
    assert kills >= len(plan) - 1
    assert check_after_kill(killed, None) == STEPS
    assert not [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]
    final = f"checkpoints/step_{STEPS:06d}/policy.safetensors"
    a, b = load_file(str(straight / final)), load_file(str(killed / final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    columns = [c for c in metrics_rows(straight)[0] if c.startswith(("env/", "loss/", "eval/"))]
    assert [[r[c] for c in columns] for r in metrics_rows(killed)] == [
        [r[c] for c in columns] for r in metrics_rows(straight)
    ]
    record_testsuite_property("training.kills", kills)


def test_a_resumed_run_log_keeps_each_step_once(tmp_path):
    from agents.run_log import RunLog

    first = RunLog(tmp_path, total_steps=3, progress=False, tensorboard=False)
    for step in (1, 2):  # step 2 is logged, then the run dies before its checkpoint
        first.log(step, {"env/reward": 0.5})
        first.log_samples(step, [{"completion": "x"}])
    first.close()
    resumed = RunLog(tmp_path, total_steps=3, start_step=1, progress=False, tensorboard=False)
    resumed.log(2, {"env/reward": 0.5})
    resumed.log_samples(2, [{"completion": "x"}])
    resumed.close()
    assert [int(r["step"]) for r in metrics_rows(tmp_path)] == [1, 2]  # metrics.csv does it right
    steps = [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
