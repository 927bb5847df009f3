"""The Lagrangian baseline in the spirit of DA-GRPO (agents.da_grpo): its dual advantage and loss on
hand-checked numbers, the dual ascent on lambda, lambda through a checkpoint, its config checks,
and a short training run on the tiny random model that resumes with the saved lambda."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from agents.batch import Rollout
from agents.config import TrainConfig
from agents.da_grpo import DAGRPO, DAGRPOConfig, batch_cloud_rate, da_grpo_loss, dual_advantages, dual_step
from agents.registry import register_configs, to_objects
from agents.trainer import Trainer
from collab_env.config import BudgetConfig
from collab_env.errors import ConfigError

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")

# Two prompts, G = 4: (final answer correct, cloud admitted, reward) per sample.
CORRECT = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
CLOUD = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
# By hand, lambda = 0.5. Prompt 0: mean r 0.5, mean c 0.25, so A = (0.5 - 0.375, -0.5 + 0.125,
# 0.5 + 0.125, -0.5 + 0.125). Prompt 1: r all 1 (centred 0), mean c 0.75, A = -0.5 * (c - 0.75).
EXPECTED = torch.tensor([[0.125, -0.375, 0.625, -0.375], [-0.125, -0.125, -0.125, 0.375]])


def _rollout(correct: torch.Tensor, cloud: torch.Tensor, rewards: torch.Tensor | None = None) -> Rollout:
    prompts, g = correct.shape
    n = prompts * g
    infos = [
        {"correct": bool(r), "called_cloud": bool(c), "called_help": bool(c), "outcome": "x"}
        for r, c in zip(correct.flatten(), cloud.flatten(), strict=True)
    ]
    infos[3]["called_help"] = True  # a call the budget refused: counts only under cloud_use=called
    return Rollout(
        prompt_ids=[p for p in range(prompts) for _ in range(g)],
        groups=torch.arange(n) // g,
        group_size=g,
        input_ids=torch.zeros(n, 5, dtype=torch.long),
        attention_mask=torch.ones(n, 5, dtype=torch.long),
        completion_mask=torch.ones(n, 2),
        old_logprobs=torch.zeros(n, 2),
        rewards=(correct if rewards is None else rewards).flatten(),
        infos=infos,
    )


def _algorithm(**fields) -> DAGRPO:
    return DAGRPO(DAGRPOConfig(**fields), TrainConfig(), BudgetConfig(), seed=0, max_new_tokens=8)


def test_dual_advantage_by_hand():
    torch.testing.assert_close(dual_advantages(CORRECT, CLOUD, 0.5), EXPECTED)
    # lambda = 0 is the plain centred correctness (Dr. GRPO's advantage, GAPG's without 1/(G-1)).
    torch.testing.assert_close(dual_advantages(CORRECT, CLOUD, 0.0), CORRECT - CORRECT.mean(-1, keepdim=True))


def test_prepare_and_loss_by_hand():
    algorithm = _algorithm()
    batch, metrics = algorithm.prepare(_rollout(CORRECT, CLOUD), 1, None, None)
    torch.testing.assert_close(batch.extras["advantages"][:, 0], EXPECTED.flatten())
    assert torch.all(batch.extras["coef"] == 1 / (2 * 3))  # 1 / (prompts * (G - 1)) on every token
    # 4 of 8 samples used the cloud; tau is the default budget's share, 0.3.
    assert metrics["dagrpo/lambda"] == 0.5 and metrics["dagrpo/cloud_rate"] == 0.5
    assert metrics["dagrpo/tau"] == pytest.approx(0.3)
    assert algorithm.lam == pytest.approx(0.5 + 0.01 * (0.5 - 0.3))
    # d loss / d log pi(y_i,t) = -A_i / (prompts (G - 1)): the on-policy estimator of the module docstring.
    logprobs = torch.full((8, 2), -1.0, requires_grad=True)
    loss = da_grpo_loss(logprobs, batch.extras["advantages"], batch.extras["coef"])
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, -EXPECTED.flatten()[:, None].expand(8, 2) / 6)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)  # advantages sum to zero per prompt


def test_correctness_and_cloud_use_choices():
    rewards = torch.tensor([[1.0, 0.0, 0.3, 0.0], [0.3, 0.3, 0.3, 1.0]])  # hierarchical: cloud worth 0.3
    batch, _ = _algorithm(correctness="hierarchical").prepare(
        _rollout(CORRECT, CLOUD, rewards), 1, None, None
    )
    torch.testing.assert_close(
        batch.extras["advantages"][:, 0], dual_advantages(rewards, CLOUD, 0.5).flatten()
    )
    called = CLOUD.clone()
    called[0, 3] = 1.0  # sample 3 called for help but was refused
    _, metrics = _algorithm(cloud_use="called").prepare(_rollout(CORRECT, CLOUD), 1, None, None)
    assert metrics["dagrpo/cloud_rate"] == float(called.mean()) == 5 / 8


def test_cloud_rate_per_sample_and_per_prompt():
    cloud = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert batch_cloud_rate(cloud, "sample") == 6 / 12
    assert batch_cloud_rate(cloud, "prompt") == pytest.approx(1 / 3)  # only prompt 1 has a majority


def test_lambda_rises_above_tau_and_falls_to_zero_below_it():
    assert dual_step(0.5, rate=0.5, tau=0.3, eta=0.01) == pytest.approx(0.502)
    assert dual_step(0.5, rate=0.1, tau=0.3, eta=0.01) == pytest.approx(0.498)
    assert dual_step(0.001, rate=0.0, tau=0.3, eta=0.01) == 0.0  # projected: never below zero
    algorithm = _algorithm(eta=0.5, tau=0.25)
    always = _rollout(CORRECT, torch.ones_like(CLOUD))
    never = _rollout(CORRECT, torch.zeros_like(CLOUD))
    history = [algorithm.lam]
    for step, rollout in enumerate([always, always, never, never, never, never], 1):
        algorithm.prepare(rollout, step, None, None)
        history.append(algorithm.lam)
    assert history == pytest.approx([0.5, 0.875, 1.25, 1.125, 1.0, 0.875, 0.75])
    for _ in range(10):
        algorithm.prepare(never, 0, None, None)
    assert algorithm.lam == 0.0


def test_lambda_state_is_json_and_round_trips():
    algorithm = _algorithm()
    algorithm.prepare(_rollout(CORRECT, CLOUD), 1, None, None)
    saved = json.loads(json.dumps(algorithm.state_dict()))
    fresh = _algorithm()
    assert fresh.lam == 0.5
    fresh.load_state_dict(saved)
    assert fresh.lam == algorithm.lam == pytest.approx(0.502)
    fresh.load_state_dict({})  # a checkpoint written before algorithms had state
    assert fresh.lam == 0.5


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"correctness": "local"}, "agent.correctness"),
        ({"cloud_use": "sometimes"}, "agent.cloud_use"),
        ({"rate_unit": "token"}, "agent.rate_unit"),
        ({"lambda_0": -0.1}, "agent.lambda_0"),
        ({"eta": -1.0}, "agent.eta"),
        ({"tau": 1.5}, "agent.tau"),
        ({"epochs": 2}, "agent.epochs"),
    ],
)
def test_bad_config_values_name_the_field(fields, named):
    with pytest.raises(ConfigError, match=named):
        DAGRPOConfig(**fields)


def smoke_run(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return to_objects(compose(config_name="train", overrides=["experiment=smoke", *overrides]))


def test_a_bad_override_fails_at_start_up():
    with pytest.raises(ConfigError, match="agent.rate_unit"):
        smoke_run(["agent=da_grpo", "agent.rate_unit=token"])


def _judge(trainer: Trainer) -> None:
    """Grade by the first token (even: right; a multiple of 3: an admitted cloud call), as the tiny
    random device never answers right nor calls: a signal for the advantage and a cloud rate for lambda."""
    env = trainer.env.unwrapped
    score_many = env.score_many

    def judge(prompt_ids: list[int], completions: list[list[int]]) -> list[tuple[float, dict]]:
        out = []
        for (_, info), ids in zip(score_many(prompt_ids, completions), completions, strict=True):
            right, cloud = int(ids[0]) % 2 == 0, int(ids[0]) % 3 == 0
            out.append((float(right), {**info, "correct": right, "called_cloud": cloud}))
        return out

    env.score_many = judge


def test_short_training_run_logs_lambda_and_resumes_with_it(tmp_path):
    run = smoke_run(["agent=da_grpo", "agent.eta=0.5"])
    trainer = Trainer(run, tmp_path)
    _judge(trainer)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.fit()
    with (tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    lambdas = [float(r["dagrpo/lambda"]) for r in rows]
    rates = [float(r["dagrpo/cloud_rate"]) for r in rows]
    assert lambdas[0] == 0.5 and all(0 <= rate <= 1 for rate in rates)
    for k in range(2):  # each step's multiplier is the dual step from the previous one
        assert lambdas[k + 1] == pytest.approx(max(0.0, lambdas[k] + 0.5 * (rates[k] - 0.3)), abs=1e-6)
    after = trainer.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    final = max(0.0, lambdas[2] + 0.5 * (rates[2] - 0.3))
    state = json.loads((tmp_path / "checkpoints" / "step_000003" / "state.json").read_text())
    assert math.isclose(state["algorithm"]["lambda"], final, abs_tol=1e-6)
    resumed = Trainer(run, tmp_path)
    assert resumed.start_step == 3 and resumed.algorithm.lam == state["algorithm"]["lambda"]
