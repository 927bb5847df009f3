"""Reference points: the device alone and the cloud alone."""

from __future__ import annotations

from agents.baselines.context import EvalContext, MethodResult
from collab_env.config import BudgetConfig


def device_only(ctx: EvalContext) -> MethodResult:
    """The untrained device answers everything (plain template: no help option, no cloud)."""
    env = ctx.env(template="plain", budget=BudgetConfig(mode="cap", ratio=0.0))
    return MethodResult("device_only", "Device only (untrained)", ctx.greedy(ctx.untrained_policy(), env))


def device_with_help(ctx: EvalContext) -> MethodResult:
    """The untrained device with the help option, under the test-time cap (where training starts)."""
    return MethodResult(
        "device_with_help", "Device + help option (untrained)", ctx.greedy(ctx.untrained_policy(), ctx.env())
    )


def cloud_only(ctx: EvalContext) -> MethodResult:
    """Every question goes to the cloud, without a cap: the upper bound."""
    env = ctx.env(budget=BudgetConfig(mode="none"))
    help_action = env.unwrapped.help_action
    scored = env.unwrapped.score_many(ctx.prompt_ids, [[help_action]] * len(ctx.prompt_ids))
    return MethodResult("cloud_only", "Cloud only", [info for _, info in scored])
