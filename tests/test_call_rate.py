"""The call-rate model of a prompt-blind device (agents.call_rate): its expected update by hand on a
case with no randomness left, and the fixed points' ordering that docs/gapg_vs_grpo.md relies on."""

from __future__ import annotations

import pytest

from agents.call_rate import CallRateModel, expected_update, fixed_point


def test_expected_update_by_hand_when_answers_and_cloud_are_sure():
    # Every local answer is right, the cloud always right: a call earns 0.4 and an answer 1.
    model = CallRateModel(local_accuracy=(1.0,), cloud_accuracy=1.0, alpha_c=0.4, group_size=2, batches=300)
    h = 0.5
    # A group of 2 with one call and one answer: weights (0.4 - 0.7) / 1 = -0.3 and +0.3, scores
    # 1 - h and -h, so the prompt adds -0.3 * 0.5 + 0.3 * (-0.5) = -0.3. Such a group comes with
    # probability 2h(1-h) = 0.5; the others have zero weights: g = 0.5 * -0.3 = -0.15 in expectation.
    unfiltered = expected_update(model, h, "gapg_unfiltered")
    assert unfiltered == pytest.approx(-0.15, abs=0.02)
    # With rho = 0 the filter keeps Set 1 only, the groups with a local answer (3 in 4 when h = 1/2):
    # the same sum over fewer prompts, -0.15 / 0.75 = -0.2.
    assert expected_update(model, h, "gapg", rho=0.0) == pytest.approx(-0.2, abs=0.03)
    # GRPO divides each such group by its std |0.6| / sqrt(2): weights -/+ 0.707.
    assert expected_update(model, h, "grpo") == pytest.approx(0.5 * -0.707, abs=0.05)


def test_fixed_points_order_as_documented():
    def point(alpha_c: float, algorithm: str, rho: float = 3 / 7) -> float:
        return fixed_point(CallRateModel(alpha_c=alpha_c, batches=150), algorithm, rho)

    assert point(0.3, "grpo") > 0.99  # GRPO drifts to calling on every prompt
    assert point(0.3, "gapg") < 0.05  # at alpha_c = 0.3 GAPG stops calling
    middle = point(0.45, "gapg")
    assert 0.1 < middle < 0.9  # a rate inside (0, 1) that training keeps
    assert point(0.45, "gapg", rho=1.0) > middle + 0.1  # a larger Set 2 quota moves it up
    assert point(0.6, "gapg") > middle + 0.1  # and so does a larger alpha_c
    assert point(0.45, "gapg_unfiltered") > 0.99  # without the filter there is no interior rate
