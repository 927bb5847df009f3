"""Every agent trains end to end on the smoke preset and moves its parameters; on a two-answer toy a few
steps raise the training reward; a killed run resumes to identical parameters."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from agents.algorithm import update
from agents.baselines.trained import TASK_TUNED, variant
from agents.batch import Rollout
from agents.checkpoint import list_checkpoints
from agents.config import AgentConfig, TrainConfig
from agents.gapg import GAPGConfig
from agents.grpo import DrGRPOConfig, GRPOConfig
from agents.policy import Policy
from agents.ppo import PPOConfig
from agents.registry import make_algorithm, register_configs, to_objects
from agents.trainer import Trainer
from collab_env.config import BudgetConfig
from collab_env.errors import ConfigError

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
REPO = Path(__file__).resolve().parents[1]


def smoke_run(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return to_objects(compose(config_name="train", overrides=["experiment=smoke", *overrides]))


def judge_first_token(trainer: Trainer) -> list[float]:
    """Grade the trainer's completions by their first token (even id: right) instead of the arithmetic
    answer, which the tiny random device never gets right: a reward that every group splits on, so an
    algorithm that learns anything must move the parameters. Returns the list the judged rewards go to."""
    env, judged = trainer.env.unwrapped, []
    score_many = env.score_many

    def judge(prompt_ids: list[int], completions: list[list[int]]) -> list[tuple[float, dict]]:
        out = []
        for (_, info), ids in zip(score_many(prompt_ids, completions), completions, strict=True):
            right = int(ids[0]) % 2 == 0
            outcome = "local_correct" if right else "wrong"
            out.append((float(right), {**info, "local_correct": right, "outcome": outcome}))
        judged.extend(r for r, _ in out)
        return out

    env.score_many = judge  # the rollout engine scores through env.unwrapped.score_many
    return judged


@pytest.mark.parametrize("agent", ["gapg", "grpo", "dr_grpo", "ppo"])
def test_smoke_training_runs_for_each_agent(agent, tmp_path):
    extra = {"gapg": "agent.filtering=false", "ppo": "agent.ent_coef=0.05"}.get(agent, "train.lr=1e-3")
    run = smoke_run([f"agent={agent}", extra])
    trainer = Trainer(run, tmp_path)
    judged = judge_first_token(trainer)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    metrics = trainer.fit()
    with (tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert {"env/reward", "env/help_rate", "train/step_time", "eval/accuracy"} <= set(rows[-1])
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert (tmp_path / "samples.jsonl").read_text().count("\n") == 3 * run.train.log_samples
    # The logged training reward is the judged one, and it was not constant: there was a signal ...
    per_step = run.train.prompts_per_step * run.train.group_size
    assert len(judged) == 3 * per_step and 0 < sum(judged) < len(judged)
    for row, step in zip(rows, range(3), strict=True):
        assert float(row["env/reward"]) == pytest.approx(
            sum(judged[step * per_step : (step + 1) * per_step]) / per_step
        )
    # ... and every step updated the policy: a trainer or an algorithm that does nothing fails here.
    assert all(float(r["train/updated"]) == 1.0 for r in rows)
    after = trainer.policy.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, changed


def test_lora_trains_and_checkpoints_only_the_adapters(tmp_path):
    run = smoke_run(["agent=gapg", "agent.filtering=false", "train.lora_rank=4", "train.lr=1e-2"])
    trainer = Trainer(run, tmp_path)
    judge_first_token(trainer)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.fit()
    after = trainer.policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if "lora_" in k}
    assert adapters and changed == adapters  # every adapter moved (B from zero, then A), nothing else
    saved = load_file(str(list_checkpoints(tmp_path)[-1] / "policy.safetensors"))
    assert set(saved) == adapters and all(torch.equal(saved[k], after[k]) for k in saved)


TOY_VOCAB, RIGHT, WRONG = 64, 7, 11
TOY_PROMPTS = torch.tensor([[3, 4, 5, 6], [9, 8, 7, 6]])


class _ToyVocabulary:
    pad_token_id = 0

    def __len__(self) -> int:
        return TOY_VOCAB


@torch.no_grad()
def toy_p_right(policy: Policy) -> torch.Tensor:
    """The toy's expected training reward per prompt: P(right) among the two answers."""
    return policy.model(input_ids=TOY_PROMPTS).logits[:, -1, [RIGHT, WRONG]].softmax(-1)[:, 0]


def train_on_the_toy(agent: AgentConfig, steps: int = 6, group: int = 4) -> list[float]:
    """GAPG / GRPO / Dr. GRPO / PPO on a two-answer toy: each completion is one token, RIGHT (reward 1,
    locally correct) or WRONG (reward 0), sampled on-policy between the two; the registry's algorithm
    and the shared `update` loop learn from it. Returns the expected reward before and after each step."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TOY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    policy = Policy(LlamaForCausalLM(config).eval(), _ToyVocabulary(), value_head=agent.name == "ppo")
    algorithm = make_algorithm(
        agent, TrainConfig(micro_batch_size=8, max_grad_norm=0.0), BudgetConfig(), 0, 1
    )
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.05)
    draws = torch.Generator().manual_seed(0)
    history = [float(toy_p_right(policy).mean())]
    for step in range(1, steps + 1):
        right = torch.rand(len(TOY_PROMPTS) * group, generator=draws) < toy_p_right(policy).repeat_interleave(
            group
        )
        ids = torch.cat(
            [TOY_PROMPTS.repeat_interleave(group, 0), torch.where(right, RIGHT, WRONG)[:, None]], 1
        )
        n = len(ids)
        with torch.no_grad():
            old = policy(ids, torch.ones_like(ids), 1).logprobs
        batch = Rollout(
            prompt_ids=[p for p in range(len(TOY_PROMPTS)) for _ in range(group)],
            groups=torch.arange(n) // group,
            group_size=group,
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            completion_mask=torch.ones(n, 1),
            old_logprobs=old,
            rewards=right.float(),
            infos=[
                {"local_correct": bool(r), "cloud_correct": False, "called_help": False, "outcome": "x"}
                for r in right
            ],
        )
        policy.train()
        prepared, _ = algorithm.prepare(batch, step, policy, None)
        if prepared is not None:
            update(algorithm, policy, optimizer, prepared, torch.Generator().manual_seed(step))
        policy.eval()
        history.append(float(toy_p_right(policy).mean()))
    return history


@pytest.mark.parametrize(
    "agent", [GAPGConfig(), GRPOConfig(), DrGRPOConfig(), PPOConfig()], ids=lambda a: a.name
)
def test_a_few_steps_raise_the_training_reward_on_a_two_answer_toy(agent):
    history = train_on_the_toy(agent)
    assert history[0] < 0.5 and history[-1] > history[0] + 0.3, history  # 0.43 -> about 0.9 for each
    assert all(b >= a - 0.02 for a, b in zip(history, history[1:], strict=False)), history


def test_bad_override_fails_before_anything_loads():
    with pytest.raises(Exception, match="agent.set1_rule"):
        smoke_run(["agent=gapg", "agent.set1_rule=sometimes"])
    with pytest.raises(Exception, match="group_size"):
        smoke_run(["train.group_size=1"])
    with pytest.raises(Exception, match="set1rule"):
        smoke_run(["agent=gapg", "agent.set1rule=mixed"])


def _train_command(run_dir: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "agents.train", "experiment=smoke", "agent=ppo", "agent.ent_coef=0.05",
        f"train.steps={steps}", "train.save_every=1", "train.keep_last=10", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    # One intra-op thread: with two, float reductions can differ between processes in the 7th digit.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    steps = 6
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(
        _train_command(straight, steps), cwd=REPO, env=env, check=True, capture_output=True, timeout=600
    )

    process = subprocess.Popen(
        _train_command(killed, steps), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_000002" / "state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "final_metrics.json").exists()
    resumed_from = max(int(p.name.split("_")[1]) for p in list_checkpoints(killed))
    assert resumed_from < steps

    subprocess.run(
        _train_command(killed, steps), cwd=REPO, env=env, check=True, capture_output=True, timeout=600
    )
    final_straight = load_file(str(straight / "checkpoints" / f"step_{steps:06d}" / "policy.safetensors"))
    final_killed = load_file(str(killed / "checkpoints" / f"step_{steps:06d}" / "policy.safetensors"))
    assert final_straight.keys() == final_killed.keys()
    for name, value in final_straight.items():
        assert torch.equal(value, final_killed[name]), name
    with (killed / "metrics.csv").open() as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == list(range(1, steps + 1))


def test_half_written_checkpoints_are_never_loaded(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step_000009.tmp-123").mkdir(parents=True)
    (root / ".step_000009.tmp-123" / "state.json").write_text("{}")
    (root / "step_000010").mkdir()  # no state.json: the rename never happened
    (root / "step_000004").mkdir()
    (root / "step_000004" / "state.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004"]


def compose_experiment(name: str, overrides: list[str], entry: str = "train"):
    """The RunConfig that `python -m agents.<entry> experiment=<name> <overrides>` runs with."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return to_objects(compose(config_name=entry, overrides=[f"experiment={name}", *overrides]))


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        # paper-spec section 5.3: |D_b|, G, lr, steps, response and prompt lengths, alpha_c
        ("countdown_paper", ["device.path=/models/qwen"], (32, 8, 5e-6, 800, 720, 256, 0.25)),
        ("math_paper", ["device.path=/m", "task.path=/d.jsonl"], (128, 8, 2e-6, 800, 1024, 1024, 0.3)),
    ],
)
def test_paper_presets_carry_the_papers_settings(name, overrides, expected):
    run = compose_experiment(name, overrides)
    train, env = run.train, run.env
    got = (train.prompts_per_step, train.group_size, train.lr, train.steps)
    got += (env.max_new_tokens, env.max_prompt_tokens, env.reward.alpha_c)
    assert got == expected
    assert run.budget.share == pytest.approx(0.3) and run.rollout.temperature == 1.0
    assert run.agent.name == "gapg" and run.device.path == overrides[0].split("=")[1]


def test_presets_name_what_they_still_need():
    with pytest.raises(ConfigError, match="needs device.path"):
        compose_experiment("countdown_paper", [])
    run = compose_experiment("arithmetic_smollm2", [])
    assert run.device.name == "smollm2" and run.warmup is not None and run.warmup.name == "format_sft"
    main, long = compose_experiment("arithmetic_cpu", []), compose_experiment("arithmetic_cpu_long", [])
    assert (long.train.steps, long.train.lr, long.name) == (600, 2e-4, "arithmetic_cpu_long")
    assert long.env == main.env and long.device == main.device and long.task == main.task


def test_hidden_cpu_long_anchors_only_gapgs_content_and_trains_every_run_longer():
    main, long = compose_experiment("hidden_cpu", []), compose_experiment("hidden_cpu_long", [])
    assert (long.agent.name, long.agent.kl_anchor, long.agent.kl_anchor_scope) == ("gapg", 0.1, "content")
    assert (long.train.steps, long.evaluate.seeds, long.name) == (240, [0, 1, 2], "hidden_cpu_long")
    assert long.env == main.env and long.device == main.device and long.task == main.task
    assert long.evaluate.methods == main.evaluate.methods
    for agent, template in (TASK_TUNED, ("grpo", None), ("da_grpo", None)):  # the anchor is GAPG's alone
        assert variant(long, agent, template).agent == variant(main, agent, template).agent
