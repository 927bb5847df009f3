"""The math of GAPG, GRPO and PPO against values worked out by hand on small fixed batches; GAPG's
KL anchor (skill keeping) by hand and for two trainer steps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_train_smoke import judge_first_token

from agents.batch import Rollout
from agents.config import TrainConfig
from agents.distributed import QuietLog
from agents.gapg import GAPG, GAPGConfig, gapg_loss, gapg_weights, select_prompts
from agents.grpo import GRPO, GRPOConfig, clipped_surrogate, grpo_advantages, kl_k3
from agents.policy import PolicyOutput
from agents.ppo import PPOConfig, gae, terminal_rewards
from agents.registry import register_configs, to_objects
from agents.trainer import Trainer
from collab_env.config import BudgetConfig
from collab_env.errors import ConfigError


def test_gapg_weights_are_centred_and_divided_by_g_minus_one():
    rewards = torch.tensor([[1.0, 0.0, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[0.675, -0.325, -0.025, -0.325], [0.0, 0.0, 0.0, 0.0]]) / 3
    torch.testing.assert_close(gapg_weights(rewards), expected)
    # The std-scaled variant: the first group's sample std is 0.4717 (unbiased); the second stays 0.
    std = torch.tensor([0.675**2 + 0.325**2 + 0.025**2 + 0.325**2]).div(3).sqrt()
    torch.testing.assert_close(gapg_weights(rewards, scale_by_std=True)[0], expected[0] / (std + 1e-4))
    assert torch.equal(gapg_weights(rewards, scale_by_std=True)[1], torch.zeros(4))


def test_gapg_weights_equal_the_leave_one_out_baseline_over_g():
    rewards = torch.rand(5, 8)
    g = rewards.shape[1]
    leave_one_out = torch.stack(
        [rewards[:, i] - (rewards.sum(1) - rewards[:, i]) / (g - 1) for i in range(g)], 1
    )
    torch.testing.assert_close(gapg_weights(rewards), leave_one_out / g)  # (r_i - mean_{j!=i}) / G


LOCAL = torch.tensor(
    [
        [True, False, False, False],  # 0: solvable, mixed
        [True, True, True, True],  # 1: all correct
        [False, False, False, False],  # 2: cloud helps
        [False, False, False, False],  # 3: cloud helps
        [False, False, False, False],  # 4: nothing works
    ]
)
CLOUD = torch.tensor(
    [
        [False, False, True, False],
        [False, False, False, False],
        [False, True, False, False],
        [True, True, False, False],
        [False, False, False, False],
    ]
)


@pytest.mark.parametrize(
    ("rho", "rule", "order", "set1", "set2"),
    [
        (0.5, "any_local_correct", "first", [0, 1], [2]),  # quota floor(0.5 * 2) = 1
        (1.0, "any_local_correct", "first", [0, 1], [2, 3]),
        (3 / 7, "any_local_correct", "first", [0, 1], []),  # floor(0.86) = 0
        (1.0, "mixed", "first", [0], [2]),  # the all-correct prompt leaves Set 1
        (0.0, "any_local_correct", "first", [0, 1], []),
    ],
)
def test_gapg_prompt_filter_sets_and_quota(rho, rule, order, set1, set2):
    got1, got2, candidates = select_prompts(LOCAL, CLOUD, rho, rule, order, np.random.default_rng(0))
    assert (got1, got2, candidates) == (set1, set2, 2)


def test_gapg_random_set2_order_draws_among_candidates():
    drawn = {
        tuple(select_prompts(LOCAL, CLOUD, 0.5, "any_local_correct", "random", np.random.default_rng(s))[1])
        for s in range(20)
    }
    assert drawn == {(2,), (3,)}


def _rollout(rewards: torch.Tensor, local: torch.Tensor, cloud: torch.Tensor, lengths: list[int]) -> Rollout:
    prompts, g = rewards.shape
    n, width = prompts * g, max(lengths)
    mask = torch.zeros(n, width)
    for i, k in enumerate(lengths):
        mask[i, :k] = 1
    infos = [
        {
            "local_correct": bool(local.flatten()[i]),
            "cloud_correct": bool(cloud.flatten()[i]),
            "outcome": "x",
            "called_help": False,
        }
        for i in range(n)
    ]
    return Rollout(
        prompt_ids=[p for p in range(prompts) for _ in range(g)],
        groups=torch.arange(n) // g,
        group_size=g,
        input_ids=torch.zeros(n, 3 + width, dtype=torch.long),
        attention_mask=torch.ones(n, 3 + width, dtype=torch.long),
        completion_mask=mask,
        old_logprobs=torch.zeros(n, width),
        rewards=rewards.flatten(),
        infos=infos,
    )


def test_gapg_gradient_equals_the_paper_estimator_on_a_toy_policy():
    """d(loss)/d(theta) == -(1/|S|) sum_x 1/(G-1) sum_i grad log pi(y_i) (r_i - mean r)   (v3 eqs. 2, 5)."""
    torch.manual_seed(0)
    rewards = torch.tensor([[1.0, 0.0, 0.3, 0.0], [0.0, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    local = rewards == 1.0
    cloud = rewards == 0.3
    lengths = [2, 3, 1, 2, 2, 1, 3, 2, 1, 1, 2, 2]
    rollout = _rollout(rewards, local, cloud, lengths)
    algorithm = GAPG(
        GAPGConfig(set2_order="first"), TrainConfig(), BudgetConfig(ratio=1.0), seed=0, max_new_tokens=8
    )
    batch, metrics = algorithm.prepare(rollout, step=1, policy=None, reference=None)
    assert metrics["gapg/set1"] == 1 and metrics["gapg/set2"] == 1  # prompt 0 (local), prompt 1 (cloud)
    theta = torch.randn(2, 3, requires_grad=True)  # a toy "policy": token log-probs are linear in theta
    features = torch.randn(len(rollout.prompt_ids), 3, 3)
    token_logprobs = torch.einsum("nlk,sk->nls", features, theta).sum(-1)
    rows = [rollout.prompt_ids.index(p) for p in (0, 1)]
    chosen = torch.cat([torch.arange(r, r + 4) for r in rows])
    loss = gapg_loss(
        token_logprobs[chosen] * batch.completion_mask, batch.extras["advantages"], batch.extras["coef"]
    )
    (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
    expected = torch.zeros_like(theta)
    for p in (0, 1):
        r = rewards[p]
        for i in range(4):
            n = p * 4 + i
            seq_logprob = token_logprobs[n, : lengths[n]].sum()
            (g_i,) = torch.autograd.grad(seq_logprob, theta, retain_graph=True)
            expected += g_i * (r[i] - r.mean()) / 3
    torch.testing.assert_close(grad, -expected / 2)


def test_gapg_refuses_several_epochs():
    with pytest.raises(ConfigError, match="on-policy"):
        GAPGConfig(epochs=2)


class _Reference:
    """A frozen "starting model" whose log-prob of token 5 is -1 + ln 2 and of any other token -1."""

    device = torch.device("cpu")
    head_cost = 0.0

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int, **_):
        return PolicyOutput(-1.0 + math.log(2) * (input_ids[:, -completion_len:] == 5).float())


def _kl_batch(kl_anchor: float):
    rollout = _rollout(
        torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.tensor([[True, False, False, False]]),
        torch.zeros(1, 4, dtype=torch.bool), [2, 1, 1, 1],
    )  # fmt: skip
    rollout.input_ids[0, -2:] = 5  # sample 0's two tokens are where the reference differs
    algorithm = GAPG(GAPGConfig(kl_anchor=kl_anchor), TrainConfig(), BudgetConfig(), seed=0, max_new_tokens=8)
    reference = _Reference() if algorithm.needs_reference else None
    batch, _ = algorithm.prepare(rollout, step=1, policy=None, reference=reference)
    out = PolicyOutput(-batch.completion_mask)  # the current policy: log pi = -1 on every token
    return algorithm, batch, out


def test_gapg_kl_anchor_adds_the_k3_term_by_hand():
    algorithm, batch, out = _kl_batch(0.1)
    assert algorithm.needs_reference
    loss, metrics = algorithm.loss(out, batch)
    # Policy term: -(1/3) [0.75 * (-2) - 0.25 * (-1) * 3] = 0.25. KL: sample 0's tokens have
    # ref - lp = ln 2, so k3 = 2 - ln 2 - 1 each; summed over its 2 tokens, averaged over G = 4.
    kl = 2 * (1 - math.log(2)) / 4
    assert metrics["loss/policy"] == pytest.approx(0.25) and metrics["loss/kl"] == pytest.approx(kl)
    assert float(loss) == pytest.approx(0.25 + 0.1 * kl)


def test_gapg_kl_anchor_zero_is_exactly_the_papers_loss():
    algorithm, batch, out = _kl_batch(0.0)
    assert not algorithm.needs_reference and "ref_logprobs" not in batch.extras
    loss, metrics = algorithm.loss(out, batch)
    assert torch.equal(loss, gapg_loss(out.logprobs, batch.extras["advantages"], batch.extras["coef"]))
    assert set(metrics) == {"loss/policy"}
    with pytest.raises(ConfigError, match="agent.kl_anchor"):
        GAPGConfig(kl_anchor=-0.1)


def test_gapg_kl_anchor_in_the_trainer(tmp_path):
    register_configs()
    configs = str(Path(__file__).resolve().parents[1] / "configs")
    overrides = ["experiment=smoke", "agent=gapg", "agent.kl_anchor=0.1", "agent.filtering=false"]
    with initialize_config_dir(config_dir=configs, version_base=None):
        run = to_objects(compose(config_name="train", overrides=[*overrides, "train.steps=2"]))
    trainer = Trainer(run, tmp_path)
    judge_first_token(trainer)
    assert trainer.reference is not None
    first, second = trainer.step(1, QuietLog()), trainer.step(2, QuietLog())
    assert first["loss/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy still is the starting model
    assert second["loss/kl"] > 0  # one update later it has moved away from it


def test_grpo_advantages_scale_by_std_and_dr_grpo_does_not():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    std = torch.tensor(0.5)  # unbiased std of [1, 0, 0, 0]
    torch.testing.assert_close(
        grpo_advantages(rewards, True, 0.0), torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / std
    )
    torch.testing.assert_close(
        grpo_advantages(rewards, False, 1e-4), torch.tensor([[0.75, -0.25, -0.25, -0.25]])
    )
    # The paper's example (v3 App. C.1): [2.2, 0, ...] and [0.5, 0, ...] get the same top advantage under GRPO.
    a = grpo_advantages(torch.tensor([[2.2, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]), True, 0.0)
    torch.testing.assert_close(a[0], a[1])


@pytest.mark.parametrize(("loss_type", "first_row"), [("grpo", 1 / (4 * 2)), ("dr_grpo", 1 / (4 * 8))])
def test_grpo_loss_normalisers(loss_type, first_row):
    rollout = _rollout(
        torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
        torch.zeros(1, 4, dtype=torch.bool),
        torch.zeros(1, 4, dtype=torch.bool),
        [2, 3, 1, 4],
    )
    algorithm = GRPO(GRPOConfig(loss_type=loss_type), TrainConfig(), BudgetConfig(), seed=0, max_new_tokens=8)
    batch, _ = algorithm.prepare(rollout, 1, None, None)
    coef = batch.extras["coef"]
    assert coef[0, 0] == pytest.approx(first_row) and coef[0, 2] == 0.0
    if loss_type == "grpo":
        torch.testing.assert_close(coef.sum(1), torch.full((4,), 0.25))  # each sequence weighs 1/N


def test_clipped_surrogate_by_hand():
    logprobs = torch.log(torch.tensor([1.5, 0.5, 0.5, 1.0]))
    old = torch.zeros(4)
    advantages = torch.tensor([1.0, 1.0, -1.0, 2.0])
    surrogate, clipped = clipped_surrogate(logprobs, old, advantages, 0.2, 0.2)
    torch.testing.assert_close(surrogate, torch.tensor([1.2, 0.5, -0.8, 2.0]))
    torch.testing.assert_close(clipped, torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_kl_k3_is_zero_at_equality_and_positive_otherwise():
    lp = torch.tensor([-1.0, -2.0])
    assert torch.all(kl_k3(lp, lp) == 0)
    assert torch.all(kl_k3(lp, lp + 0.5) > 0) and torch.all(kl_k3(lp, lp - 0.5) > 0)


def test_gae_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = terminal_rewards(torch.tensor([1.0, 0.3]), mask)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.3, 0.0]]))
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.1, 9.9]]) * mask
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 0: deltas 0.1, 0.1, 0.3 -> A2 = 0.3, A1 = 0.1 + 0.5 * 0.3, A0 = 0.1 + 0.5 * 0.25.
    torch.testing.assert_close(advantages[0], torch.tensor([0.225, 0.25, 0.3]))
    # Row 1: deltas -0.1 (0 + 0.1 - 0.2), 0.2 (0.3 - 0.1); the padded step contributes nothing.
    torch.testing.assert_close(advantages[1], torch.tensor([-0.1 + 0.5 * 0.2, 0.2, 0.0]))
    torch.testing.assert_close(returns[0], torch.tensor([0.725, 0.85, 1.0]))


def test_gae_with_gamma_below_one():
    mask = torch.ones(1, 2)
    advantages, _ = gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.9, 1.0]]))


def test_ppo_config_checks():
    with pytest.raises(ConfigError, match="gamma"):
        PPOConfig(gamma=0.0)
    with pytest.raises(ConfigError, match="group_size"):
        TrainConfig(group_size=1)
