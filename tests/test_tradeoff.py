"""Evaluation metrics against hand-computed values: PGR, APGR, CPT, the cap, router calibration."""

from __future__ import annotations

import numpy as np
import pytest

from agents.baselines.routers import fit_logistic
from agents.tradeoff import accuracy_at, apgr, calibrated_threshold, cpt, pgr, route, threshold_curve


def test_pgr():
    assert pgr(0.75, device=0.5, cloud=1.0) == pytest.approx(0.5)
    assert pgr(0.5, device=0.5, cloud=1.0) == 0.0 and pgr(1.0, device=0.5, cloud=1.0) == 1.0
    assert np.isnan(pgr(0.7, device=0.5, cloud=0.5))


def test_apgr_and_cpt_on_hand_made_curves():
    diagonal = [(0.5, 0.75)]  # halfway in rate, halfway in accuracy
    assert apgr(diagonal, 0.5, 1.0) == pytest.approx(0.5)
    assert cpt(diagonal, 0.5, 1.0, 0.5) == pytest.approx(0.5)
    concave = [(0.2, 0.9)]  # 20% of calls close 80% of the gap
    # Trapezoids: 0.2 * (0 + 0.8) / 2 + 0.8 * (0.8 + 1) / 2 = 0.08 + 0.72.
    assert apgr(concave, 0.5, 1.0) == pytest.approx(0.8)
    assert cpt(concave, 0.5, 1.0, 0.5) == pytest.approx(0.125)
    assert cpt(concave, 0.5, 1.0, 0.8) == pytest.approx(0.2)
    assert cpt(concave, 0.5, 1.0, 0.9) == pytest.approx(0.2 + 0.8 * 0.5)


def test_cap_admits_first_come_first_served_and_scores_refused_calls_locally():
    local = [{"local_correct": c, "level": "x", "completion_tokens": 1} for c in (True, False, False, False)]
    cloud = [True, True, False, True]
    infos = route(local, cloud, [False, True, True, True], cap=2)
    assert [i["outcome"] for i in infos] == ["local_correct", "cloud_correct", "wrong", "over_budget"]
    assert [i["correct"] for i in infos] == [True, True, False, False]
    assert [i["called_cloud"] for i in infos] == [False, True, True, False]
    assert accuracy_at(local, cloud, [False, True, True, True]) == (0.75, 0.75)  # without the cap


def test_threshold_curve_sends_the_highest_scores_first():
    local = [{"local_correct": c, "level": "x", "completion_tokens": 1} for c in (True, False, True, False)]
    cloud = [True] * 4
    points = threshold_curve(local, cloud, [0.1, 0.9, 0.2, 0.8], [0.25, 0.5, 1.0])
    assert points == [(0.25, 0.75), (0.5, 1.0), (1.0, 1.0)]


def test_router_threshold_calibration_hits_the_budget_on_held_out_prompts():
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        hard = rng.random(n) < 0.4
        x = rng.normal(size=(n, 8)).astype(np.float32)
        x[:, 0] += np.where(hard, 1.0, -1.0)  # a noisy surface signal of difficulty
        return x, hard.astype(np.float32)

    train_x, train_y = draw(2000)
    test_x, _ = draw(2000)
    model = fit_logistic(train_x, train_y)
    import torch

    with torch.no_grad():
        train_scores = torch.sigmoid(model(torch.as_tensor(train_x))).squeeze(-1).numpy()
        test_scores = torch.sigmoid(model(torch.as_tensor(test_x))).squeeze(-1).numpy()
    threshold = calibrated_threshold(train_scores, 0.3)
    assert abs(float((train_scores >= threshold).mean()) - 0.3) < 0.01
    assert abs(float((test_scores >= threshold).mean()) - 0.3) < 0.05  # the stated tolerance: 5 points
