"""Where the training call-for-help rate of a prompt-blind device settles under GAPG and GRPO.

A device too small to tell the prompts it can solve from the others calls for help with one
probability h on every prompt: its first token is the same format tag on every prompt, so the state
it decides from carries little of the question (the 7M-parameter `tiny-arith` device, whose call
rate moves alike on every level; docs/gapg_vs_grpo.md). Such a device has a single degree of
freedom for the call, the logit of h, and training moves it by the expected update

    g(h) = E[ 1/|S| sum_{x in S} sum_i w_i * d log pi(y_i^theta | x) / d logit(h) ],

with d log pi / d logit(h) = 1 - h for a sample that calls and -h for one that answers, w_i the
algorithm's per-sample weight (GAPG: (r_i - mean r) / (G - 1), v3 eq. 2; GRPO: divided by the
group's std, v3 App. C.1 eq. 16) and S the prompts it learns from (GAPG: Set 1 and at most
rho * |Set 1| of Set 2, Alg. 1; GRPO and unfiltered GAPG: all of them). The call rate drifts to the
fixed point h* where g changes sign from + to -. This module estimates g by Monte Carlo, with the
library's own weights and filter, for a device whose local accuracy on each level is fixed, and
finds h*:

    python -m agents.call_rate                    # tiny-arith's accuracies at temperature 1
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass

import numpy as np
import torch

from agents.gapg import gapg_weights, select_prompts
from agents.grpo import grpo_advantages

TINY_ARITH_LOCAL_ACCURACY = (0.855, 0.524, 0.285, 0.023, 0.0)
"""tiny-arith's accuracy when it answers, at temperature 1, on add2, add2_carry, add3, mul21, mul22:
docs/device_models.md's accuracy divided by the share of samples that do not call."""


@dataclass(frozen=True)
class CallRateModel:
    """A prompt-blind device on a task of equally frequent levels, with a fixed local accuracy each."""

    local_accuracy: tuple[float, ...] = TINY_ARITH_LOCAL_ACCURACY
    cloud_accuracy: float = 0.98
    alpha_a: float = 1.0
    alpha_c: float = 0.3
    group_size: int = 8
    prompts_per_step: int = 16
    batches: int = 400
    """Monte Carlo batches per estimate; the same random draws serve every h, so g is smooth in h."""
    seed: int = 0

    @functools.cached_property
    def draws(self) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        shape = (self.batches, self.prompts_per_step, self.group_size)
        levels = torch.randint(len(self.local_accuracy), shape[:2], generator=gen)
        return {
            "call": torch.rand(shape, generator=gen),
            "local": torch.rand(shape, generator=gen),
            "cloud": torch.rand(shape[:2], generator=gen),
            "accuracy": torch.tensor(self.local_accuracy)[levels][..., None],
        }


ALGORITHMS = ("gapg", "gapg_unfiltered", "grpo")


def expected_update(model: CallRateModel, help_rate: float, algorithm: str, rho: float = 3 / 7) -> float:
    """Monte Carlo estimate of g(h) for `algorithm` (gapg, gapg_unfiltered or grpo) at h = `help_rate`."""
    draws = model.draws
    calls = draws["call"] < help_rate
    local_correct = ~calls & (draws["local"] < draws["accuracy"])
    cloud_correct = calls & (draws["cloud"] < model.cloud_accuracy)[..., None]
    rewards = model.alpha_a * local_correct.float() + model.alpha_c * cloud_correct.float()
    if algorithm == "grpo":
        weights = grpo_advantages(rewards, scale_by_std=True, std_epsilon=1e-4)
    else:
        weights = gapg_weights(rewards)
    score = torch.where(calls, 1 - help_rate, -help_rate)
    per_prompt = (weights * score).sum(-1)
    rng = np.random.default_rng(model.seed)
    total = 0.0
    for batch in range(model.batches):
        if algorithm == "gapg":
            set1, set2, _ = select_prompts(
                local_correct[batch], cloud_correct[batch], rho, "any_local_correct", "random", rng
            )
            chosen = set1 + set2
        else:
            chosen = list(range(model.prompts_per_step))
        if chosen:
            total += float(per_prompt[batch, chosen].mean())
    return total / model.batches


RATE_BOUNDS = (0.005, 0.995)


def fixed_point(
    model: CallRateModel,
    algorithm: str,
    rho: float = 3 / 7,
    low: float = RATE_BOUNDS[0],
    high: float = RATE_BOUNDS[1],
) -> float:
    """The call rate h* in [low, high] where g changes sign from + to - (bisection); `low` when g < 0
    already there (the device stops calling), `high` when g > 0 up to there (it always calls)."""
    if expected_update(model, low, algorithm, rho) <= 0:
        return low
    if expected_update(model, high, algorithm, rho) >= 0:
        return high
    for _ in range(12):
        middle = (low + high) / 2
        if expected_update(model, middle, algorithm, rho) > 0:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def describe(rate: float) -> str:
    """A fixed point as the table shows it: the bounds of `fixed_point` mean 'drifts to 0 / to 100%'."""
    if rate <= RATE_BOUNDS[0]:
        return "-> 0%"
    if rate >= RATE_BOUNDS[1]:
        return "-> 100%"
    return f"{rate:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpha-c", type=float, nargs="+", default=[0.3, 0.4, 0.45, 0.5, 0.6])
    parser.add_argument("--rho", type=float, nargs="+", default=[0.25, 3 / 7, 1.0])
    parser.add_argument("--local-accuracy", type=float, nargs="+", default=list(TINY_ARITH_LOCAL_ACCURACY))
    args = parser.parse_args()
    columns = [f"GAPG rho={rho:.2f}" for rho in args.rho] + ["GAPG unfiltered", "GRPO"]
    print("| alpha_c | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for alpha_c in args.alpha_c:
        model = CallRateModel(local_accuracy=tuple(args.local_accuracy), alpha_c=alpha_c)
        points = [fixed_point(model, "gapg", rho) for rho in args.rho]
        points += [fixed_point(model, "gapg_unfiltered"), fixed_point(model, "grpo")]
        print(f"| {alpha_c} | " + " | ".join(describe(p) for p in points) + " |")


if __name__ == "__main__":
    main()
