"""GAPG's filter on a batch made by another trainer (docs/integrations.md): `select_prompts` and
`gapg_weights` applied to rewards laid out as TRL lays them out (flat, each prompt's completions
consecutive), by `gapg_advantages` of examples/trl_grpo.py, against a hand-computed result; and the
example's GRPOTrainer subclass running one step with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_trl import example_argv, load_example, script_generation

from agents.gapg import gapg_weights, select_prompts

G = 4
# Five prompts, four completions each, as TRL passes them to the reward function and as EnvReward
# returns rewards and infos: (reward, local_correct, cloud_correct) per completion.
BATCH = [
    [(1.0, True, None), (0.0, False, None), (0.3, False, True), (0.0, False, None)],  # A: Set 1
    [(0.0, False, None), (0.3, False, True), (0.3, False, True), (0.0, False, False)],  # B: Set 2 candidate
    [(0.0, False, None), (0.0, False, False), (0.0, False, None), (0.0, False, None)],  # C: nothing to learn
    [(1.0, True, None), (1.0, True, None), (1.0, True, None), (1.0, True, None)],  # D: Set 1, all correct
    [(0.3, False, True), (0.0, False, None), (0.0, False, None), (0.0, False, None)],  # E: Set 2 candidate
]
REWARDS = [r for group in BATCH for r, _, _ in group]
INFOS = [{"local_correct": local, "cloud_correct": cloud} for group in BATCH for _, local, cloud in group]


def test_select_prompts_and_gapg_weights_on_a_flat_trl_batch():
    local = torch.tensor([i["local_correct"] for i in INFOS]).view(-1, G)
    cloud = torch.tensor([bool(i["cloud_correct"]) for i in INFOS]).view(-1, G)
    rng = np.random.default_rng(0)
    # rho = 1/2 of |Set 1| = 2 gives a quota of one Set 2 prompt: the first candidate, B.
    assert select_prompts(local, cloud, 0.5, "any_local_correct", "first", rng) == ([0, 3], [1], 2)
    assert select_prompts(local, cloud, 0.5, "mixed", "first", rng) == ([0], [], 2)  # floor(0.5 * 1) = 0
    assert select_prompts(local, cloud, 3 / 7, "any_local_correct", "first", rng) == ([0, 3], [], 2)
    weights = gapg_weights(torch.tensor(REWARDS).view(-1, G))
    expected_a = [
        (1.0 - 0.325) / 3,
        (0.0 - 0.325) / 3,
        (0.3 - 0.325) / 3,
        (0.0 - 0.325) / 3,
    ]  # (r - mean) / (G - 1)
    assert weights[0].tolist() == pytest.approx(expected_a)
    assert weights[1].tolist() == pytest.approx([-0.05, 0.05, 0.05, -0.05])
    assert weights[3].tolist() == [0.0] * G


def test_gapg_advantages_keep_set1_and_set2_scaled_to_the_per_prompt_average():
    example = load_example("trl_grpo")
    rng = np.random.default_rng(0)
    advantages, set1, set2 = example.gapg_advantages(REWARDS, INFOS, G, 0.5, rng, set2_order="first")
    assert (set1, set2) == ([0, 3], [1])
    scale = 5 / 3  # prompts in the batch / prompts kept, so TRL's dr_grpo constant gives GAPG's 1/|S|
    expected = [0.0] * (5 * G)
    expected[0:4] = [scale * w for w in [0.225, -0.325 / 3, -0.025 / 3, -0.325 / 3]]
    expected[4:8] = [scale * w for w in [-0.05, 0.05, 0.05, -0.05]]
    assert advantages.tolist() == pytest.approx(expected)
    # Random Set 2 order: one of the two candidates, never C.
    _, _, set2 = example.gapg_advantages(REWARDS, INFOS, G, 0.5, np.random.default_rng(1))
    assert set2 in ([1], [4])
    # Nothing kept: all advantages 0 (TRL then learns nothing from the batch).
    nothing = [{"local_correct": False, "cloud_correct": None}] * (2 * G)
    advantages, set1, set2 = example.gapg_advantages([0.0] * (2 * G), nothing, G, 0.5, rng)
    assert (set1, set2) == ([], []) and advantages.tolist() == [0.0] * (2 * G)


def test_the_example_trainer_applies_the_filter_inside_trl(tmp_path, cloud_cache, monkeypatch):
    pytest.importorskip("trl")
    example = load_example("trl_grpo")
    script_generation(monkeypatch, example, cloud_cache)  # right, help, wrong, sampled in each group
    trainer, reward = example.main(example_argv(tmp_path, cloud_cache, 1, 2, "--gapg"))
    assert type(trainer).__name__ == "GAPGFilteredTrainer" and trainer.args.loss_type == "dr_grpo"
    rho = reward.env.budget.config.ratio
    rng = np.random.default_rng([0, 0])  # the trainer's: seed 0, step 0
    expected, set1, _ = example.gapg_advantages(reward.last_rewards, reward.last_infos, G, rho, rng)
    assert set1 == [0, 1]  # both prompts have a right answer
    trained = trainer._buffered_inputs[0]["advantages"]  # what TRL trained on (rows shuffled)
    assert sorted(trained.tolist()) == pytest.approx(sorted(expected.tolist()))
    assert list(trainer._logs["advantages"]) == pytest.approx(expected.tolist())  # its completions table
    assert expected.abs().sum() > 0
    (logged,) = [entry for entry in trainer.state.log_history if "gapg/set1" in entry]
    assert logged["gapg/set1"] == 2.0
