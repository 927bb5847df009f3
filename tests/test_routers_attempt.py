"""The score-based routers over the task-tuned device (agents.baselines.routers.scored_router and
agents.baselines.signal_routers): the hidden-state probe, the question-feature router and the
confidence router. The device's answers and log-probabilities are scripted (a tiny random model
answers nothing right), so what each router should do is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import encode
from hydra import compose, initialize_config_dir
from test_train_smoke import CONFIGS

from agents.baselines import METHODS, EvalContext, routers, run_method, signal_routers
from agents.baselines.context import router_train_ids
from agents.baselines.signal_routers import doubt, parse_question, question_features
from agents.registry import register_configs, to_objects
from agents.report import write_report
from agents.rollout.hf import HFRollout
from agents.tradeoff import calibrated_threshold, roc_auc
from collab_env.config import SPLITS, TaskConfig
from collab_env.decoding import Generation
from collab_env.tasks import make_task


def lowest_logprob(problem) -> float:
    """A distinct lowest token log-probability per prompt (37 is invertible mod 101: ids below 101 differ)."""
    return -(0.1 + (problem.id * 37) % 101 / 10)


def recorded_doubt(problems) -> np.ndarray:
    """The confidence router's scores of `problems`, as the evaluation records them (float32 log-probs)."""
    logprobs = np.array([lowest_logprob(p) for p in problems], dtype=np.float32).astype(np.float64)
    return np.array([1.0 - math.exp(lp) for lp in logprobs])


@pytest.fixture
def context(tmp_path, monkeypatch):
    """`context(right)`: an EvalContext of the smoke experiment whose task-tuned device is the tiny
    random model, answering right where `right(problem)` says, with the lowest token log-probability
    `lowest_logprob(problem)` in the middle of its completion (the other tokens at -0.01); with
    `right=None` the model decodes for itself."""

    def make(right=None) -> EvalContext:
        register_configs()
        with initialize_config_dir(config_dir=CONFIGS, version_base=None):
            run = to_objects(
                compose(config_name="evaluate", overrides=["experiment=smoke", "env.max_new_tokens=24"])
            )
        ctx = EvalContext(run, tmp_path)
        task = ctx.task

        def generate(self, prompts, max_new_tokens, greedy, seed, help_bias=0.0, stop_rules=True):
            of = {tuple(self.env.prompt_tokens(p.id).tolist()): p for s in SPLITS for p in task.problems(s)}
            completions, logprobs = [], []
            for prompt in prompts:
                problem = of[tuple(np.asarray(prompt).tolist())]
                answer = problem.answer if right(problem) else str(int(problem.answer) + 1)
                completion = encode(self.env, task.template.render_answer(answer))
                scores = [-0.01] * len(completion)
                scores[len(completion) // 2] = lowest_logprob(problem)
                completions.append(completion)
                logprobs.append(scores)
            return Generation(completions, logprobs)

        if right is not None:
            monkeypatch.setattr(HFRollout, "generate", generate)
        tuned = lambda ctx, agent, template: (ctx.untrained_policy(), tmp_path)  # noqa: E731
        monkeypatch.setattr(routers, "trained_policy", tuned)
        monkeypatch.setattr(signal_routers, "trained_policy", tuned)
        return ctx

    return make


def test_roc_auc_by_hand():
    fails = np.array([False, False, True, True])
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), fails) == 0.75  # 3 of the 4 (fail, right) pairs in order
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.9]), fails) == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)  # ties: 1/2
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([True, True])))


def test_the_parser_reads_numbers_and_operations_of_both_tasks():
    assert parse_question("Calculate 37 + 48.") == ([37.0, 48.0], ["+"])
    assert parse_question("Calculate 12 * 7.") == ([12.0, 7.0], ["*"])
    running = "Start with 37, add 48, subtract 29, then add 56."
    assert parse_question(running) == ([37.0, 48.0, 29.0, 56.0], ["+", "-", "+"])
    features = question_features(["Calculate 37 + 48.", running])
    assert features.shape == (2, 3 * 4 + 3)  # value, units, tens per number; one code per operation
    np.testing.assert_array_equal(features[1], [37, 7, 3, 48, 8, 4, 29, 9, 2, 56, 6, 5, 1, 2, 1])
    np.testing.assert_array_equal(features[0, :6], [37, 7, 3, 48, 8, 4])
    assert np.isnan(features[0, 6:12]).all() and features[0, 12] == 1 and np.isnan(features[0, 13:]).all()
    for name in ("running_total", "arithmetic"):  # every generated question, read back
        for problem in make_task(TaskConfig(name=name, num_train=40, num_test=10)).problems("train"):
            data = problem.data
            numbers, ops = parse_question(problem.question)
            if name == "arithmetic":
                assert (numbers, ops) == ([data["a"], data["b"]], [data["op"]])
            else:
                assert numbers == [data["start"], *(operand for _, operand in data["ops"])]
                assert ops == [op for op, _ in data["ops"]]


def test_the_confidence_router_sends_the_least_confident_prompts(context):
    ctx = context(lambda p: lowest_logprob(p) > -5.0)  # the less sure completions are the wrong ones
    result = run_method("confidence_router", ctx)
    train = [ctx.task.problem(i) for i in router_train_ids(ctx)]
    train_doubt = recorded_doubt(train)
    threshold = result.extra["router/threshold"]
    assert threshold == calibrated_threshold(train_doubt, ctx.run.budget.share)
    # the threshold sends the budget's share of the training prompts (distinct scores: within one prompt)
    assert abs((train_doubt >= threshold).mean() - ctx.run.budget.share) <= 1 / len(train)
    test_doubt = recorded_doubt([ctx.task.problem(i) for i in ctx.prompt_ids])
    wants = [i["called_help"] for i in result.infos]
    assert wants == (test_doubt >= threshold).tolist() and 0 < sum(wants) < len(wants)
    # exactly the least confident: every prompt sent is less sure than every prompt kept
    assert test_doubt[wants].min() > test_doubt[~np.array(wants)].max()
    # the cap then admits the first of them in prompt order
    admitted = [i["prompt_id"] for i in result.infos if i["called_cloud"]]
    assert admitted == [pid for pid, w in zip(ctx.prompt_ids, wants, strict=True) if w][: ctx.share_cap]
    assert result.extra["router/test_auc"] == 1.0 == result.extra["router/train_auc"]
    fails = test_doubt > 1 - np.exp(-5.0)
    # accuracy at a 0.5 score: "wrong" predicted where some token had a probability of 1/2 or less
    assert result.extra["router/test_accuracy"] == ((test_doubt >= 0.5) == fails).mean() < 1
    assert result.curve and result.alone_accuracy == pytest.approx(1 - fails.mean())
    assert doubt({"min_token_prob": 0.25}) == 0.75


def test_the_feature_router_learns_which_operation_fails(context):
    ctx = context(lambda p: p.data["op"] == "+")  # the device gets every product wrong
    result = run_method("feature_router", ctx)
    products = [ctx.task.problem(i).data["op"] == "*" for i in ctx.prompt_ids]
    assert 0 < sum(products) < len(products)
    assert result.extra["router/test_auc"] == 1.0 and result.extra["router/train_accuracy"] > 0.85
    assert all(p for i, p in zip(result.infos, products, strict=True) if i["called_help"])
    assert len(result.curve) == 19


def test_the_probe_reads_the_tuned_devices_hidden_state_of_the_prompt(context):
    ctx = context(lambda p: p.id % 3 != 0)
    ids = ctx.prompt_ids[:3]
    states = signal_routers.prompt_hidden_states(ctx, "test", ids)
    model = ctx.untrained_policy().model
    prompt = torch.as_tensor(ctx.env("plain").unwrapped.prompt_tokens(ids[1]))[None]
    with torch.no_grad():
        by_hand = model.model(input_ids=prompt).last_hidden_state.mean(1)[0].numpy()
    assert states.shape == (3, model.config.hidden_size)
    np.testing.assert_allclose(states[1], by_hand, rtol=1e-4, atol=1e-5)


def test_every_router_reports_its_diagnostics_under_its_name(context, tmp_path):
    ctx = context(lambda p: p.id % 3 != 0)
    names = ["prompt_router", "probe_router", "feature_router", "confidence_router"]
    assert set(names) <= set(METHODS)
    results = [run_method(name, ctx) for name in names]
    keys = {"router/train_accuracy", "router/test_accuracy", "router/test_auc", "router/train_auc"}
    for result in results:
        assert keys <= set(result.extra) and 0 <= result.extra["router/test_accuracy"] <= 1
        assert sum(i["called_cloud"] for i in result.infos) <= ctx.share_cap
    write_report(tmp_path / "report", {0: results}, ctx.cloud_correct(ctx.prompt_ids), {"name": "t"})
    written = json.loads((tmp_path / "report" / "results.json").read_text())["methods"]
    assert list(written) == names and "probe" in names[1]
    assert written["probe_router"]["metrics"]["router/test_auc"] == results[1].extra["router/test_auc"]


def test_the_confidence_router_scores_the_probabilities_tuned_local_keeps(context):
    """Decoded for itself, the device's greedy completions are decoded once: the confidence router's
    scores are one minus the `min_token_prob` of the infos `tuned_local` keeps, which the routers route."""
    ctx = context()
    calls = []
    evaluate = ctx.evaluate
    ctx.evaluate = lambda *args, **kwargs: calls.append(kwargs["split"]) or evaluate(*args, **kwargs)
    result = run_method("confidence_router", ctx)
    assert sorted(calls) == ["test", "train"]  # one evaluation per split, no second decoding
    local = routers.tuned_local(ctx, "test", ctx.prompt_ids)
    assert all(0 < info["min_token_prob"] <= 1 for info in local)
    scores = [1 - info["min_token_prob"] for info in local]
    assert [i["called_help"] for i in result.infos] == [s >= result.extra["router/threshold"] for s in scores]
