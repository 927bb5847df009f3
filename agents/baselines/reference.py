"""Reference points: the device alone and the cloud alone."""

from __future__ import annotations

from agents.baselines.context import EvalContext, MethodResult
from agents.metrics import summarize
from agents.runs import no_cloud
from collab_env.config import BudgetConfig


def device_only(ctx: EvalContext) -> MethodResult:
    """The untrained device answers everything (plain template: no help option, no cloud)."""
    infos = ctx.evaluate(ctx.untrained_policy(), template="plain", budget=no_cloud()).infos
    return MethodResult(
        "device_only", "Device only (untrained)", infos, alone_accuracy=summarize(infos)["accuracy"]
    )


def device_with_help(ctx: EvalContext) -> MethodResult:
    """The untrained device with the help option, under the test-time cap (where training starts)."""
    return ctx.policy_result("device_with_help", "Device + help option (untrained)", ctx.untrained_policy())


def device_with_help_calibrated(ctx: EvalContext) -> MethodResult:
    """The untrained device with the help option and a help bias calibrated to the budget."""
    return ctx.calibrated_result(
        "device_with_help_calibrated",
        "Device + help option (untrained), budget-calibrated",
        ctx.untrained_policy(),
    )


def cloud_only(ctx: EvalContext) -> MethodResult:
    """Every question goes to the cloud, without a cap: the upper bound."""
    env = ctx.env(budget=BudgetConfig(mode="none"))
    help_action = env.unwrapped.help_action
    scored = env.unwrapped.score_many(ctx.prompt_ids, [[help_action]] * len(ctx.prompt_ids))
    return MethodResult("cloud_only", "Cloud only", [info for _, info in scored])
