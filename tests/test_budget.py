"""Cloud-budget accounting over a window, the cap rule and its resets."""

from __future__ import annotations

import pytest

from collab_env.budget import CloudBudget
from collab_env.config import BudgetConfig


def test_counts_add_up_in_train_mode():
    budget = CloudBudget(BudgetConfig(mode="train"))
    admitted = [budget.record(i % 2 == 0) for i in range(10)]
    assert admitted == [i % 2 == 0 for i in range(10)]  # train mode never refuses
    assert (budget.calls, budget.episodes, budget.used_share) == (5, 10, 0.5)
    assert budget.observation().tolist() == pytest.approx([0.3, 0.5])


def test_online_cap_keeps_the_running_share_within_rho_over_one_plus_rho():
    budget = CloudBudget(BudgetConfig(mode="cap", ratio=3 / 7))
    admitted = [budget.record(True) for _ in range(20)]
    # A call is admitted while calls + 1 <= 0.3 * (episodes + 1).
    assert [i + 1 for i, a in enumerate(admitted) if a] == [4, 7, 10, 14, 17, 20]
    assert budget.calls == 6 and budget.calls <= 0.3 * budget.episodes + 1e-9


def test_window_cap_admits_first_come_first_served_then_starts_a_new_window():
    budget = CloudBudget(BudgetConfig(mode="cap", ratio=3 / 7, window=10))
    first = [budget.record(True) for _ in range(10)]
    assert first == [True] * 3 + [False] * 7
    second = [budget.record(True) for _ in range(10)]
    assert second == first and budget.episodes == 10 and budget.calls == 3


def test_reset_window_and_penalty():
    budget = CloudBudget(BudgetConfig(mode="penalty", penalty=0.25))
    budget.record(True)
    assert budget.penalty(True) == 0.25 and budget.penalty(False) == 0.0
    budget.reset_window()
    assert (budget.calls, budget.episodes) == (0, 0)
    assert CloudBudget(BudgetConfig(mode="train")).penalty(True) == 0.0


def test_env_budget_window_resets_on_seeded_reset_and_option(make_env):
    env = make_env()
    env.reset(seed=0)
    _, _, _, _, info = env.step(env.unwrapped.help_action)
    assert info["budget"]["episodes"] == 1
    env.reset()
    _, _, _, _, info = env.step(env.unwrapped.help_action)
    assert info["budget"] == {"calls": 2, "episodes": 2, "ratio": 1.0, "over_budget": False}
    env.reset(options={"reset_budget": True})
    _, _, _, _, info = env.step(env.unwrapped.help_action)
    assert info["budget"]["episodes"] == 1
    env.reset(seed=1)
    _, _, _, _, info = env.step(0)
    env.reset()
    assert env.unwrapped.budget.episodes == 1  # token 0 is EOS; an unseeded reset keeps the window
