"""Two-stage baselines on the task-tuned device: random offload, a prompt router, an oracle router.

All three route before the device answers, using the task-tuned model's greedy local answers
(plain template, no help option) and the cloud's answers; the test-time cap then admits at most
floor(rho/(1+rho) * N) calls in prompt order.

The paper's router is DeBERTa-v3-large fine-tuned on the prompts (Hybrid LLM); no model hub is
reachable here, so ours is a logistic-regression classifier on frozen all-MiniLM-L6-v2 sentence
embeddings of the question (shipped on the package index), trained on which training prompts the
task-tuned model answers correctly, with its threshold calibrated on those training prompts so
that a rho/(1+rho) share of them would go to the cloud (paper-spec section 6, open question 8).

Every score-based router (this prompt router and those of agents.baselines.signal_routers) goes
through `scored_router`: its score, in [0, 1], reads as the chance that the task-tuned device gets
the prompt wrong; one threshold, calibrated on the training prompts' scores, decides the calls; the
same diagnostics go in `extra`: `router/train_accuracy` and `router/test_accuracy` (right/wrong
classification accuracy at a 0.5 score, as agents.report's table says, whatever the threshold),
`router/train_auc` and `router/test_auc` (ROC AUC of the score for predicting that the device
fails), `router/test_call_rate_before_cap` and `router/threshold`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from agents import sb3, tianshou
from agents.baselines.context import CURVE_RATES, EvalContext, MethodResult, failures, router_train_ids
from agents.baselines.trained import TASK_TUNED, trained_policy
from agents.external import Fit, run_episodes
from agents.runs import make_eval_env, no_cloud
from agents.tradeoff import calibrated_threshold, roc_auc, route, threshold_curve
from collab_env.config import SPLITS
from collab_env.features import minilm_features


def tuned_local(ctx: EvalContext, split: str, prompt_ids: list[int]) -> list[dict[str, Any]]:
    """Greedy local answers of the task-tuned device (no help option, no cloud) for `prompt_ids`: the
    final infos of `evaluation.evaluate_policy`, each with its `completion` and `min_token_prob`.

    Kept per prompt for the whole evaluation, so each prompt is answered once whichever methods ask for
    it (a greedy answer without the cloud depends on its batch only through float rounding)."""
    known: dict[int, dict[str, Any]] = ctx.memo(f"tuned-local:{split}", dict)
    missing = [i for i in dict.fromkeys(prompt_ids) if i not in known]
    if missing:
        policy, _ = trained_policy(ctx, *TASK_TUNED)
        answers = ctx.evaluate(policy, template="plain", budget=no_cloud(), prompt_ids=missing, split=split)
        known.update({info["prompt_id"]: info for info in answers.infos})
    return [known[i] for i in prompt_ids]


def _held_out(ctx: EvalContext) -> tuple[list[dict[str, Any]], list[bool]]:
    return tuned_local(ctx, ctx.run.evaluate.split, ctx.prompt_ids), ctx.cloud_correct(ctx.prompt_ids)


def routed(
    ctx: EvalContext,
    name: str,
    label: str,
    to_cloud: list[bool],
    scores: list[float],
    extra: dict[str, float] | None = None,
) -> MethodResult:
    """The row of a router over the task-tuned device: `to_cloud` under the cap, the curve of `scores`
    (need for help, highest first), and the task-tuned device's accuracy on its own."""
    local, cloud = _held_out(ctx)
    return MethodResult(
        name,
        label,
        route(local, cloud, to_cloud, ctx.share_cap),
        threshold_curve(local, cloud, scores, CURVE_RATES),
        extra=extra or {},
        alone_accuracy=sum(i["local_correct"] for i in local) / max(len(local), 1),
    )


def random_offload(ctx: EvalContext) -> MethodResult:
    """A random rho/(1+rho) share of the questions goes to the cloud (task-tuning & naive offloading)."""
    n = len(ctx.prompt_ids)
    order = np.random.default_rng(ctx.run.evaluate.seed).permutation(n)
    chosen = set(order[: ctx.share_cap].tolist())
    scores = np.empty(n)
    scores[order] = np.arange(n, 0, -1)
    to_cloud = [i in chosen for i in range(n)]
    return routed(ctx, "random_offload", "Task-tuning + random offload", to_cloud, scores.tolist())


def oracle_gain(local: list[dict[str, Any]], cloud_correct: list[bool]) -> list[float]:
    """What sending each prompt to the cloud gains: +1 where only the cloud is right, -1 where only the
    device is, 0 otherwise."""
    return [float(c) - float(i["local_correct"]) for i, c in zip(local, cloud_correct, strict=True)]


def oracle_router(ctx: EvalContext) -> MethodResult:
    """Sends exactly the questions the task-tuned device gets wrong and the cloud gets right; its curve
    sends them first, then those where neither gains, and last those only the device gets right: no
    router over the same device does better at any call rate (an upper bound)."""
    gain = oracle_gain(*_held_out(ctx))
    return routed(ctx, "oracle_router", "Task-tuning + oracle router", [g > 0 for g in gain], gain)


def fit_logistic(
    features: np.ndarray, labels: np.ndarray, weight_decay: float = 1e-3, steps: int = 300
) -> torch.nn.Linear:
    """A logistic-regression classifier (full-batch L-BFGS, L2 penalty) predicting `labels` (1 = device fails)."""
    torch.manual_seed(0)
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32)
    model = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)
        loss = loss + weight_decay * model.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def scored_router(
    ctx: EvalContext,
    name: str,
    label: str,
    train_scores: np.ndarray,
    test_scores: np.ndarray,
) -> MethodResult:
    """The row of a router that scores each prompt's chance of a wrong device answer (highest first):
    the threshold that sends a rho/(1+rho) share of the training prompts (`router_train_ids`, scored
    by `train_scores`) to the cloud, the held-out prompts at or above it sent (then the cap), and the
    diagnostics of the module docstring."""
    train_fails = failures(tuned_local(ctx, "train", router_train_ids(ctx)))
    test_fails = failures(_held_out(ctx)[0])
    train_scores, test_scores = np.asarray(train_scores, float), np.asarray(test_scores, float)
    threshold = calibrated_threshold(train_scores, ctx.run.budget.share)
    to_cloud = test_scores >= threshold
    extra = {
        "router/train_accuracy": float(((train_scores >= 0.5) == train_fails).mean()),
        "router/test_accuracy": float(((test_scores >= 0.5) == test_fails).mean()),
        "router/train_auc": roc_auc(train_scores, train_fails),
        "router/test_auc": roc_auc(test_scores, test_fails),
        "router/test_call_rate_before_cap": float(to_cloud.mean()),
        "router/threshold": threshold,
    }
    return routed(ctx, name, label, to_cloud.tolist(), test_scores.tolist(), extra)


Classifier = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""(train features, train labels: 1 = device fails, test features) -> P(fails) on train and on test."""


def logistic_scores(
    train_x: np.ndarray, labels: np.ndarray, test_x: np.ndarray, standardize: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """A `Classifier`: `fit_logistic`, on features standardised by the training prompts' mean and
    spread when `standardize` (hidden states, whose dimensions differ in scale by orders of magnitude)."""
    if standardize:
        mean, spread = train_x.mean(0), train_x.std(0) + 1e-6
        train_x, test_x = (train_x - mean) / spread, (test_x - mean) / spread
    model = fit_logistic(train_x, labels.astype(np.float32))

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(model(torch.as_tensor(x, dtype=torch.float32))).squeeze(-1).numpy()

    return predict(train_x), predict(test_x)


def classifier_router(
    ctx: EvalContext,
    name: str,
    label: str,
    featurize: Callable[[str, list[int]], np.ndarray],
    classifier: Classifier,
) -> MethodResult:
    """A router that predicts from `featurize(split, prompt_ids)` which prompts the task-tuned device gets
    wrong, trained on its outcomes on the training prompts (`scored_router` does the rest)."""
    train_ids = router_train_ids(ctx)
    labels = failures(tuned_local(ctx, "train", train_ids))
    train_x = featurize("train", train_ids)
    test_x = featurize(ctx.run.evaluate.split, ctx.prompt_ids)
    train_scores, test_scores = classifier(train_x, labels, test_x)
    return scored_router(ctx, name, label, train_scores, test_scores)


def prompt_router(ctx: EvalContext) -> MethodResult:
    """Task-tuning + a learned prompt router (classifier on question embeddings, threshold at the budget)."""

    def embed(_: str, ids: list[int]) -> np.ndarray:
        return minilm_features([ctx.task.problem(i).question for i in ids])

    return classifier_router(ctx, "prompt_router", "Task-tuning + prompt router", embed, logistic_scores)


def routing_device_answers(ctx: EvalContext) -> dict[int, str]:
    """The task-tuned device's answer to every prompt of every split, as `DeviceCloudRouting-v0`'s
    `device_answers`: each a short completion stating the answer in the template's format (the routing
    env grades the answer only, so this scores exactly as the device's own completion did)."""
    task = ctx.task
    answers = {}
    for split in SPLITS:
        ids = [p.id for p in task.problems(split)]
        for info in tuned_local(ctx, split, ids):
            answer = info["local_answer"]
            answers[info["prompt_id"]] = "" if answer is None else task.template.render_answer(answer)
    return answers


def learned_router(ctx: EvalContext, name: str, label: str, agent: Any, fit: Fit) -> MethodResult:
    """Task-tuning + a PPO router trained on `DeviceCloudRouting-v0` by an external RL library.

    The routing env holds the task-tuned device's answers, so the router learns from the rewards of
    routing that device's prompts (training split, `agent`'s features); it is then run greedily on the
    held-out prompts under the test-time cap; its curve orders the prompts by its probability of
    calling the cloud on each one's first observation. Its run lives in `runs/<agent>-routing/seed<seed>/`.
    """
    run = dataclasses.replace(ctx.run, agent=agent)
    env_kwargs = {"device_answers": ctx.memo("routing-answers", lambda: routing_device_answers(ctx))}
    run_dir = ctx.experiment_dir / "runs" / f"{agent.name}-routing" / f"seed{run.seed}"
    print(f"[evaluate] training the {agent.name} router in {run_dir}", flush=True)
    fitted = fit(run, run_dir, env_kwargs)
    env = make_eval_env(run, len(ctx.prompt_ids), "routing", agent.features, env_kwargs)
    observations: list[Any] = []
    rewards, infos = run_episodes(env, fitted.act_for(env), ctx.prompt_ids, observations)
    env.close()
    local, cloud = _held_out(ctx)
    scores = fitted.help_probability(observations).tolist()
    return MethodResult(
        name,
        label,
        infos,
        threshold_curve(local, cloud, scores, CURVE_RATES),
        extra={"router/mean_reward": float(np.mean(rewards))},
        alone_accuracy=sum(i["local_correct"] for i in local) / max(len(local), 1),
    )


def sb3_router(ctx: EvalContext) -> MethodResult:
    """Task-tuning + a Stable-Baselines3 PPO router on the routing env."""
    return learned_router(ctx, "sb3_router", "Task-tuning + SB3 PPO router", sb3.SB3PPOConfig(), sb3.fit)


def tianshou_router(ctx: EvalContext) -> MethodResult:
    """Task-tuning + a Tianshou PPO router on the routing env."""
    return learned_router(
        ctx,
        "tianshou_router",
        "Task-tuning + Tianshou PPO router",
        tianshou.TianshouPPOConfig(),
        tianshou.fit,
    )
