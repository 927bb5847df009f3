"""Routers over the task-tuned device on other signals of difficulty than the question's embedding:

| name                | signal                                                                      |
|---------------------|-----------------------------------------------------------------------------|
| `probe_router`      | the device's own hidden state of the prompt, before it writes anything      |
| `feature_router`    | the question's numbers and operations, read by hand (task knowledge)        |
| `confidence_router` | the device's confidence over its own attempt (after it has answered)        |

Like the prompt router they route the task-tuned device's greedy answers (`routers.tuned_local`),
are labelled by its right/wrong on the training prompts and go through `routers.scored_router`
(threshold calibrated so that a rho/(1+rho) share of the training prompts would go to the cloud,
the same diagnostics). The probe is a logistic regression on the mean last hidden state of the
prompt tokens under the task-tuned model (`collab_env.features.device_features`, standardised); the
feature router is gradient boosting (`HistGradientBoostingClassifier`) on the question's integers in
order, each with its units and tens digit (where carries show), and its operation signs, padded
with missing values to the longest question of the routed prompts.

The confidence router needs no training: a question goes to the cloud when the lowest token
probability over the device's whole greedy completion (its steps, its answer and the stop text) is
below the threshold; its score is one minus that probability (at 0.5: some token was a coin toss or
worse). The whole completion rather than the answer tokens alone: a device that writes
its steps (`device=tiny-reason`) hesitates where a step carries or borrows, and its answer then
follows confidently from whatever that step wrote; and it needs no mapping of the answer's characters
back onto tokens. The probability is the one `evaluation.evaluate_policy` records with each greedy
completion it decodes (`min_token_prob` of every info `tuned_local` keeps): for a completion that
called, that of the help-banned completion the device then answers with, so the score is always
that of the answer routed.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

from agents.baselines.context import EvalContext, MethodResult, router_train_ids
from agents.baselines.routers import classifier_router, logistic_scores, scored_router, tuned_local
from agents.baselines.trained import TASK_TUNED, trained_policy
from agents.runs import no_cloud
from collab_env.features import device_features

_TOKENS = re.compile(
    r"(\d+(?:\.\d+)?)|([+\-*/×÷])|\b(add|plus|subtract|minus|times|multiply|multiplied|divide|divided)\b",
    re.IGNORECASE,
)
SIGNS = {
    **dict.fromkeys(("+", "add", "plus"), "+"),
    **dict.fromkeys(("-", "subtract", "minus"), "-"),
    **dict.fromkeys(("*", "×", "times", "multiply", "multiplied"), "*"),
    **dict.fromkeys(("/", "÷", "divide", "divided"), "/"),
}
"""Operation words and symbols of a question -> its sign."""
CODES = {"+": 1, "-": 2, "*": 3, "/": 4}
"""Operation sign -> the number the feature router sees."""


def parse_question(question: str) -> tuple[list[float], list[str]]:
    """The numbers of a question in order (unsigned: a minus sign is read as an operation) and its
    operations as signs: "Start with 37, add 48, subtract 29." -> ([37, 48, 29], ["+", "-"])."""
    numbers, ops = [], []
    for number, symbol, word in _TOKENS.findall(question):
        if number:
            numbers.append(float(number))
        else:
            ops.append(SIGNS[(symbol or word).lower()])
    return numbers, ops


def feature_width(questions: list[str]) -> tuple[int, int]:
    """(numbers, operations): the most any of `questions` has."""
    parsed = [parse_question(q) for q in questions]
    return max((len(n) for n, _ in parsed), default=0), max((len(o) for _, o in parsed), default=0)


def question_features(questions: list[str], width: tuple[int, int] | None = None) -> np.ndarray:
    """(N, 3 * numbers + ops) float features: each number's value, units and tens digit, then each
    operation's code, NaN where a question has fewer (gradient boosting reads NaN as missing);
    `width` = (numbers, ops), by default `feature_width(questions)`."""
    numbers, ops = width or feature_width(questions)
    out = np.full((len(questions), max(3 * numbers + ops, 1)), np.nan)
    for row, question in enumerate(questions):
        values, signs = parse_question(question)
        for k, value in enumerate(values[:numbers]):
            whole = int(abs(value))
            out[row, 3 * k : 3 * k + 3] = (value, whole % 10, whole // 10 % 10)
        for k, sign in enumerate(signs[:ops]):
            out[row, 3 * numbers + k] = CODES[sign]
    return out


def boosting_scores(
    train_x: np.ndarray, labels: np.ndarray, test_x: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A `routers.Classifier`: gradient boosting (sklearn defaults, seed 0); with one class only, its
    share everywhere (nothing to learn). One OpenMP thread: on a few thousand rows the fit takes well
    under a second, while its threads spinning on a busy machine (or beside torch's) took 14 s for 60."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        share = float(labels.mean()) if len(labels) else 0.0
        return np.full(len(train_x), share), np.full(len(test_x), share)
    with threadpool_limits(limits=1, user_api="openmp"):
        model = HistGradientBoostingClassifier(random_state=0).fit(train_x, labels)
        column = list(model.classes_).index(True)
        return model.predict_proba(train_x)[:, column], model.predict_proba(test_x)[:, column]


def prompt_hidden_states(ctx: EvalContext, split: str, prompt_ids: list[int]) -> np.ndarray:
    """(N, hidden) mean last hidden state of the task-tuned model over each prompt's tokens (plain
    template, the prompt the device answers), before it writes anything."""
    policy, _ = trained_policy(ctx, *TASK_TUNED)
    env = ctx.env("plain", no_cloud(), split).unwrapped
    model = policy.transformers_model
    prompts = [env.prompt_tokens(i) for i in prompt_ids]
    return device_features(model, prompts, int(env.tokenizer.pad_token_id), ctx.run.evaluate.max_batch)


def probe_router(ctx: EvalContext) -> MethodResult:
    """Task-tuning + a logistic-regression probe on the device's own hidden state of the prompt."""

    featurize = functools.partial(prompt_hidden_states, ctx)
    probe = functools.partial(logistic_scores, standardize=True)
    label = "Task-tuning + hidden-state probe router"
    return classifier_router(ctx, "probe_router", label, featurize, probe)


def feature_router(ctx: EvalContext) -> MethodResult:
    """Task-tuning + gradient boosting on the question's numbers and operations (task knowledge a
    general router does not have)."""
    question = ctx.task.problem
    width = feature_width([question(i).question for i in router_train_ids(ctx) + ctx.prompt_ids])

    def featurize(_: str, prompt_ids: list[int]) -> np.ndarray:
        return question_features([question(i).question for i in prompt_ids], width)

    label = "Task-tuning + question-feature router (task knowledge)"
    return classifier_router(ctx, "feature_router", label, featurize, boosting_scores)


def doubt(info: dict[str, Any]) -> float:
    """The confidence router's score of a device answer's info: one minus the lowest token probability
    of its completion, so the least sure completions score highest."""
    return 1.0 - info["min_token_prob"]


def confidence_router(ctx: EvalContext) -> MethodResult:
    """Task-tuning + offloading where the device was least sure of its own greedy attempt (no RL)."""
    train, test = (
        np.array([doubt(info) for info in tuned_local(ctx, split, ids)])
        for split, ids in (("train", router_train_ids(ctx)), (ctx.run.evaluate.split, ctx.prompt_ids))
    )
    return scored_router(ctx, "confidence_router", "Task-tuning + confidence router", train, test)
