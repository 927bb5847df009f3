"""What every compared method gets (`EvalContext`) and gives back (`MethodResult`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from agents.config import RolloutConfig, RunConfig
from agents.evaluation import EvalResult, evaluate_policy, help_curve
from agents.metrics import summarize
from agents.policy import Policy, pick_device
from agents.runs import held_out_cap, make_env, no_cloud, resolve_device
from agents.tradeoff import calibrated_threshold, roc_auc
from collab_env.config import BudgetConfig


@dataclass
class MethodResult:
    """Per-prompt final infos of a method on the held-out prompts (after the test-time cap)."""

    name: str
    label: str
    infos: list[dict[str, Any]]
    curve: list[tuple[float, float]] = field(default_factory=list)
    """Accuracy-vs-cloud-rate points without the cap (router threshold sweeps, budget sweeps)."""
    training_metrics: Path | None = None
    """metrics.csv of the training run behind this method, if any."""
    extra: dict[str, float] = field(default_factory=dict)
    """Method-specific diagnostics (e.g. the router's classification accuracy)."""
    alone_accuracy: float | None = None
    """Accuracy of this method's own device answering every question itself (its curve at 0% calls):
    the task-tuned device for the routers, the trained policy with the help action banned for a policy."""
    sweep_points: list[tuple[float, float]] = field(default_factory=list)
    """(cloud rate, accuracy) of budget-sweep runs of the same method, each under its own cap."""

    def metrics(self) -> dict[str, float]:
        return {**summarize(self.infos), **self.extra}


CURVE_RATES = tuple(i / 20 for i in range(1, 20))
"""Cloud rates at which every method's accuracy-vs-cloud-rate curve is measured."""
MARGIN_FLOOR = 1e4
"""Help margins below -MARGIN_FLOOR (a completion that never could call) count as -MARGIN_FLOOR."""


def floored(margins: list[float]) -> np.ndarray:
    """Help margins with -inf (a completion that never reaches a branch position, so cannot call)
    raised to -MARGIN_FLOOR, so that a quantile of them stays finite; past the share of prompts that
    can call, a bias calibrated on them only grows."""
    return np.maximum(np.asarray(margins, dtype=float), -MARGIN_FLOOR)


def failures(infos: list[dict[str, Any]]) -> np.ndarray:
    """Whether the device got each prompt wrong on its own (the label every router predicts)."""
    return np.array([not i["local_correct"] for i in infos], dtype=bool)


def router_train_ids(ctx: EvalContext) -> list[int]:
    """The training prompts whose device outcomes label (and calibrate) the routers and on which a
    budget-calibrated policy picks its help bias."""
    return [p.id for p in ctx.task.problems("train")[: ctx.run.evaluate.router_prompts]]


class EvalContext:
    """What every method needs: the settings, the held-out prompt ids, scoring envs and models.

    Trained methods train their run under `<experiment dir>/runs/` when it is missing (or
    unfinished) and `evaluate.train_missing` is true; reruns reuse finished runs.
    """

    def __init__(self, run: RunConfig, experiment_dir: Path) -> None:
        self.run = run
        self.experiment_dir = Path(experiment_dir)
        self.device = pick_device(run.train.device)
        self.device_config = resolve_device(run)
        self.run = dataclasses.replace(run, device=self.device_config)
        self._policies: dict[str, Policy] = {}
        self._cache: dict[str, Any] = {}
        self.task = self.env(budget=BudgetConfig(mode="none")).unwrapped.task
        problems = self.task.problems(run.evaluate.split)
        limit = run.evaluate.num_prompts or len(problems)
        self.prompt_ids = [p.id for p in problems[:limit]]

    def env(
        self, template: str | None = None, budget: BudgetConfig | None = None, split: str | None = None
    ) -> gym.Env:
        """A scoring env; `template` overrides the task's prompt template, the budget defaults to the cap.
        Envs are kept per settings (their budget window is reset by each evaluation)."""
        run = self.run
        if template is not None:
            run = dataclasses.replace(run, task=dataclasses.replace(run.task, template=template))
        budget = budget or self.capped()
        split = split or run.evaluate.split
        return self.memo(f"env:{run.task.template}:{budget}:{split}", lambda: make_env(run, budget, split))

    def capped(self, num_prompts: int | None = None) -> BudgetConfig:
        """The test-time cap over the held-out prompts (or `num_prompts` of them)."""
        return held_out_cap(self.run, num_prompts or len(self.prompt_ids))

    @property
    def share_cap(self) -> int:
        return int(self.run.budget.share * len(self.prompt_ids) + 1e-9)

    def evaluate(
        self,
        policy: Policy,
        template: str | None = None,
        budget: BudgetConfig | None = None,
        prompt_ids: list[int] | None = None,
        split: str | None = None,
        help_bias: float = 0.0,
    ) -> EvalResult:
        """Greedy completions of the held-out prompts (or `prompt_ids`), scored in order under `budget`
        (the cap by default), refused calls answered by the device on its own (agents.evaluation)."""
        config = RolloutConfig(max_batch=self.run.evaluate.max_batch)
        ids = self.prompt_ids if prompt_ids is None else prompt_ids
        env = self.env(template, budget, split)
        local = self.env(template, no_cloud(), split)
        return evaluate_policy(
            policy, env, ids, config, self.run.evaluate.max_batch, local_env=local, help_bias=help_bias
        )

    def policy_result(
        self, name: str, label: str, policy: Policy, template: str | None = None, **fields: Any
    ) -> MethodResult:
        """A policy's row: its capped result, its help-bias curve and its accuracy on its own."""
        result = self.evaluate(policy, template)
        return MethodResult(
            name,
            label,
            result.infos,
            help_curve(result, self.cloud_correct(self.prompt_ids), CURVE_RATES),
            alone_accuracy=summarize(result.alone)["local_accuracy"],
            **fields,
        )

    def calibrated_result(self, name: str, label: str, policy: Policy, **fields: Any) -> MethodResult:
        """A policy's row when one bias b on its help action's logit is chosen as a router's threshold
        is: so that greedy decoding calls on the budget's share rho/(1+rho) of the training prompts
        (`router_train_ids`). A greedy completion calls iff its help margin (`Policy.help_margins`)
        exceeds -b, so -b is the margin above which that share of the training prompts lie; the
        held-out prompts are then decoded with b, under the cap. Greedy decoding alone (b = 0) spends
        the budget only where the help token already wins; with b the policy's own ranking of where it
        needs help decides, at the rate every router is given."""
        train = self.evaluate(
            policy, budget=BudgetConfig(mode="none"), prompt_ids=router_train_ids(self), split="train"
        )
        train_margins = floored(train.margins)
        bias = -calibrated_threshold(train_margins, self.run.budget.share)
        result = self.evaluate(policy, help_bias=bias)
        test_margins = floored(result.margins)
        extra = {
            "calibration/help_bias": bias,
            "calibration/train_call_rate": float((train_margins > -bias).mean()),
            "calibration/train_auc": roc_auc(train_margins, failures(train.alone)),
            "calibration/test_auc": roc_auc(test_margins, failures(result.alone)),
        }
        return MethodResult(
            name,
            label,
            result.infos,
            extra=extra,
            alone_accuracy=summarize(result.alone)["local_accuracy"],
            **fields,
        )

    def untrained_policy(self) -> Policy:
        if "untrained" not in self._policies:
            self._policies["untrained"] = Policy.load(self.device_config, self.device)
        return self._policies["untrained"]

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """Results shared between methods (e.g. the task-tuned model's local answers)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def cloud_correct(self, prompt_ids: list[int], split: str | None = None) -> list[bool]:
        """Whether the cloud answers each prompt correctly (cached answers; no budget)."""

        def compute() -> list[bool]:
            env = self.env(budget=BudgetConfig(mode="none"), split=split)
            help_action = env.unwrapped.help_action
            scored = env.unwrapped.score_many(prompt_ids, [[help_action]] * len(prompt_ids))
            return [bool(info["cloud_correct"]) for _, info in scored]

        return self.memo(f"cloud:{split}:{len(prompt_ids)}:{prompt_ids[:1]}", compute)
