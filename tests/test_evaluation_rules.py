"""The evaluation treats every method alike: one cap rule for routers and policies, an oracle that no
router beats, a curve for a trained policy from a bias on its help logit, and intervals that cover."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import encode
from hydra import compose, initialize_config_dir
from test_train_smoke import CONFIGS

from agents import sb3, tianshou
from agents.baselines.routers import oracle_gain
from agents.config import RolloutConfig
from agents.evaluation import EvalResult, evaluate_policy, help_curve
from agents.external import run_episodes
from agents.policy import Policy
from agents.registry import register_configs, to_objects
from agents.rollout.hf import HFRollout
from agents.runs import make_eval_env, resolve_device
from agents.tradeoff import apgr, paired_bootstrap, route, threshold_curve
from agents.trainer import Trainer
from collab_env.config import SPLITS, TaskConfig
from collab_env.decoding import Generation
from collab_env.models import load_model, load_tokenizer
from collab_env.tasks import HELP_MARKER, make_task

TINY = {"name": "tiny-random", "dtype": "float32"}


def scripted(env, calls: dict[int, bool], right: dict[int, bool]):
    """HFRollout.generate that answers by script: the marker where `calls` says so (unless the help
    action is banned), else the right or a wrong answer as `right` says; every token at log-probability
    -1/8 in a marker, -1/4 in an answer, but the first, at -(prompt id)/64 in an answer."""
    task = env.unwrapped.task
    prompt_of = {tuple(env.unwrapped.prompt_tokens(p.id).tolist()): p for p in task.problems("test")}

    def generate(self, prompts, max_new_tokens, greedy, seed, help_bias=0.0, stop_rules=True):
        out, logprobs = [], []
        for prompt in prompts:
            problem = prompt_of[tuple(np.asarray(prompt).tolist())]
            if calls[problem.id] and help_bias != -math.inf:
                out.append(encode(env, HELP_MARKER))
                logprobs.append([-1 / 8] * len(out[-1]))
            else:
                answer = problem.answer if right[problem.id] else str(int(problem.answer) + 1)
                out.append(encode(env, task.template.render_answer(answer)))
                logprobs.append([-problem.id / 64] + [-1 / 4] * (len(out[-1]) - 1))
        return Generation(out, logprobs)

    return generate


def test_a_refused_call_is_scored_alike_for_a_router_and_for_a_policy(make_env, monkeypatch):
    capped = make_env(device=TINY, budget={"mode": "cap", "ratio": 3 / 7, "window": 20}, split="test")
    local_env = make_env(device=TINY, budget={"mode": "cap", "ratio": 0.0}, split="test")
    ids = [p.id for p in capped.unwrapped.task.problems("test")][:20]
    rng = np.random.default_rng(3)
    calls = {i: bool(rng.random() < 0.6) for i in ids}  # twice the cap's 30%: many calls are refused
    right = {i: bool(rng.random() < 0.5) for i in ids}
    monkeypatch.setattr(HFRollout, "generate", scripted(capped, calls, right))
    policy = Policy(load_model(TINY), load_tokenizer("tiny-random"))
    result = evaluate_policy(policy, capped, ids, RolloutConfig(), 8, local_env=local_env)

    cloud = [bool(i["cloud_correct"]) if i["called_cloud"] else True for i in result.infos]
    routed = route(result.alone, cloud, [calls[i] for i in ids], cap=int(3 / 10 * 20))
    keys = ("called_help", "called_cloud", "correct", "outcome")
    assert [{k: i[k] for k in keys} for i in result.infos] == [{k: i[k] for k in keys} for i in routed]
    refused = [i for i in result.infos if i["outcome"] == "over_budget"]
    assert len(refused) == sum(calls.values()) - 6 > 0
    # a refused policy answers on its own: scored right exactly where its own answer is right
    assert all(i["correct"] == right[i["prompt_id"]] for i in refused)
    assert [a["local_correct"] for a in result.alone] == [right[i] for i in ids]
    # each info's lowest token probability is that of the completion it is scored on: the answer
    # written alone for a refused call, the marker for an admitted one
    answered = [min(-i / 64, -1 / 4) for i in ids]
    assert [a["min_token_prob"] for a in result.alone] == pytest.approx(np.exp(answered))
    lowest = [-1 / 8 if i["called_cloud"] else lp for i, lp in zip(result.infos, answered, strict=True)]
    assert [i["min_token_prob"] for i in result.infos] == pytest.approx(np.exp(lowest))


def test_min_token_prob_is_the_models_lowest_probability_of_a_greedy_token(make_env):
    """`min_token_prob` of a greedy completion: exp of the lowest log-softmax (temperature 1) of its
    tokens, recomputed by a plain forward pass of the model on the prompt and the completion."""
    env = make_env(device=TINY, split="test")
    policy = Policy(load_model(TINY), load_tokenizer("tiny-random"))
    ids = [p.id for p in env.unwrapped.task.problems("test")][:6]
    result = evaluate_policy(policy, env, ids, RolloutConfig(), 8)
    greedy = HFRollout(policy, env, RolloutConfig(max_batch=8)).rollout(ids, 1, greedy=True)
    tail = greedy.input_ids[:, -greedy.completion_len :]
    for pid, info, row, mask in zip(ids, result.infos, tail, greedy.completion_mask.bool(), strict=True):
        written = row[mask]
        assert info["completion"] == env.unwrapped.tokenizer.decode(
            written.tolist(), skip_special_tokens=True
        )
        prompt = torch.as_tensor(env.unwrapped.prompt_tokens(pid))
        with torch.no_grad():
            logits = policy.model(torch.cat([prompt, written])[None]).logits[0, len(prompt) - 1 : -1]
        chosen = torch.log_softmax(logits[:, : policy.vocab_size].double(), -1).gather(-1, written[:, None])
        assert 0 < info["min_token_prob"] < 1
        assert info["min_token_prob"] == pytest.approx(chosen.min().exp().item(), rel=1e-4)


@pytest.mark.parametrize("seed", range(20))
def test_no_router_over_the_same_device_beats_the_oracle(seed):
    rng = np.random.default_rng(seed)
    n = 60
    local = [{"local_correct": bool(rng.random() < 0.5)} for _ in range(n)]
    cloud = (rng.random(n) < 0.8).tolist()
    gain = oracle_gain(local, cloud)
    rates = [k / n for k in range(n + 1)]
    oracle = threshold_curve(local, cloud, gain, rates)
    for _ in range(10):
        other = threshold_curve(local, cloud, rng.random(n).tolist(), rates)
        assert all(o[1] >= x[1] - 1e-12 for o, x in zip(oracle, other, strict=True))
    for cap in (0, 5, 18, 60):
        best = sum(i["correct"] for i in route(local, cloud, [g > 0 for g in gain], cap))
        for _ in range(10):
            wants = (rng.random(n) < rng.random()).tolist()
            assert sum(i["correct"] for i in route(local, cloud, wants, cap)) <= best


def test_help_curve_and_apgr_of_a_policy_by_hand():
    # four prompts; margins order the calls: p2 first, then p0, then p3; p1 can never call
    alone = [{"local_correct": c} for c in (True, False, False, True)]
    result = EvalResult(infos=[], alone=alone, margins=[0.5, -math.inf, 2.0, -1.0])
    cloud = [True, True, True, False]
    curve = help_curve(result, cloud, (0.25, 0.5, 0.75, 1.0))
    # 25%: p2 to the cloud (right): p0, p2, p3 right = 3/4; 50%: + p0 (still right) = 3/4;
    # 75%: + p3 (the cloud is wrong there) = 2/4; 100% is out of reach (p1 never calls)
    assert curve == [(0.25, 0.75), (0.5, 0.75), (0.75, 0.5)]
    device, cloud_only = 0.5, 0.75
    # PGR at the points: 0 (r=0), 1, 1, 0, then 1 at r=1: trapezoids 0.125 + 0.25 + 0.125 + 0.125
    assert apgr(curve, device, cloud_only) == pytest.approx(0.625)


def test_help_margins_predict_where_a_help_bias_makes_greedy_decoding_call(make_env):
    """numbered_steps branches into the marker at any position: with a bias b on the help action's
    logit, greedy decoding follows the unbiased path up to the first position whose margin exceeds -b,
    then writes a branch token there; a ban (-inf) never writes one."""
    env = make_env(device=TINY, task={"name": "arithmetic", "template": "numbered_steps"}, split="test")
    policy = Policy(load_model(TINY), load_tokenizer("tiny-random"))
    engine = HFRollout(policy, env, RolloutConfig(max_batch=16))
    branches = engine.help_branches()
    tokens = sorted({b.token for b in branches})
    assert all(b.prefix == () for b in branches) and len(tokens) == 2  # '<' and ' <'
    ids = [p.id for p in env.unwrapped.task.problems("test")][:12]
    greedy = engine.rollout(ids, 1, greedy=True, max_new_tokens=8)
    margins = policy.help_margins(greedy.input_ids, greedy.attention_mask, greedy.completion_len, branches)
    prompts = [env.unwrapped.prompt_tokens(i) for i in ids]
    per_position = []
    for prompt, completion in zip(prompts, greedy.completion_mask, strict=True):
        row = len(per_position)
        written = greedy.input_ids[row, -greedy.completion_len :][completion.bool()].tolist()
        sequence = torch.tensor([[*prompt.tolist(), *written]])
        logits = policy.model(sequence).logits[0, len(prompt) - 1 : -1, : policy.vocab_size]
        rest = logits.clone()
        rest[:, tokens] = -math.inf
        per_position.append((written, (logits[:, tokens].max(-1).values - rest.max(-1).values).tolist()))
    assert [max(m) for _, m in per_position] == pytest.approx(margins.tolist(), abs=1e-4)
    bias = -float(margins.median()) + 1e-3  # about half the prompts reach a margin above -b
    biased = engine.generate(prompts, 8, greedy=True, seed=0, help_bias=bias)
    called = 0
    for (written, position_margins), out in zip(per_position, biased.completions, strict=True):
        reached = [t for t, m in enumerate(position_margins) if m + bias > 0]
        if reached:
            assert out[: reached[0]] == written[: reached[0]] and out[reached[0]] in tokens
            called += 1
        else:
            assert out == written
    assert 0 < called < len(ids)
    banned = engine.generate(prompts, 8, greedy=True, seed=0, help_bias=-math.inf)
    assert not any(t in tokens for c in banned.completions for t in c)


def test_paired_bootstrap_covers_a_known_difference():
    rng = np.random.default_rng(0)
    b = (rng.random(2000) < 0.5).astype(float)
    a = b.copy()
    flip = rng.choice(np.flatnonzero(b == 0), size=200, replace=False)
    a[flip] = 1.0  # a is right on 200 more of 2000 prompts: a difference of exactly 0.1
    mean, low, high = paired_bootstrap(a, b)
    assert mean == pytest.approx(0.1) and low < 0.1 < high and high - low < 0.04
    small = paired_bootstrap(a[:200], b[:200])
    assert small[2] - small[1] > 2 * (high - low)  # ten times fewer prompts: about sqrt(10) wider
    assert paired_bootstrap(b, b) == (0.0, 0.0, 0.0)


def test_learned_routers_call_where_their_cloud_probability_passes_one_half(tmp_path):
    """An SB3 and a Tianshou router: the probabilities that order the prompts of their curves agree with
    their greedy actions (a call exactly where P(cloud) > 1/2)."""
    register_configs()
    for agent, fit, budget in (
        ("sb3_ppo", sb3.fit, "agent.n_steps=32"),
        ("tianshou_ppo", tianshou.fit, "agent.epoch_num_steps=256"),
    ):
        overrides = ["experiment=smoke", f"agent={agent}", "agent.features=ngrams", budget]
        with initialize_config_dir(config_dir=CONFIGS, version_base=None):
            run = to_objects(compose(config_name="train", overrides=overrides))
        run = dataclasses.replace(run, device=resolve_device(run))
        fitted = fit(run, tmp_path / agent, None)
        env = make_eval_env(run, 16, "routing", "ngrams")
        ids = [p.id for p in env.unwrapped.task.problems("test")][:16]
        observations: list = []
        _, infos = run_episodes(env, fitted.act_for(env), ids, observations)
        probability = fitted.help_probability(observations)
        assert probability.shape == (16,) and ((probability >= 0) & (probability <= 1)).all()
        assert [i["called_help"] for i in infos] == (probability > 0.5).tolist()


@pytest.mark.parametrize("name", ["arithmetic", "chain_sum", "basic_arithmetic", "countdown", "gsm_symbolic"])
def test_generated_splits_share_no_question(name):
    task = make_task(TaskConfig(name=name, num_train=400, num_test=100))
    sizes = {split: len(task.problems(split)) for split in SPLITS}
    # the validation split is the last 4% of the 400 training problems; training loses the twins of
    # validation questions (arithmetic: a swapped sum), and nothing else
    assert sizes["validation"] == 16 and sizes["test"] == 100
    assert (sizes["train"] == 384) if name != "arithmetic" else (384 - 16 <= sizes["train"] <= 384)
    assert task.overlap() == {"train_validation": 0, "train_test": 0, "validation_test": 0}
    ids = [p.id for split in SPLITS for p in task.problems(split)]
    assert sorted(ids) == list(range(len(ids)))


def test_a_swapped_sum_is_the_same_question():
    task = make_task(TaskConfig(num_train=2000, num_test=500))
    test = task.problems("test")
    twin = next(p for p in test if p.data["a"] != p.data["b"])
    assert task.equivalence_key(twin) == (twin.data["op"], *sorted((twin.data["a"], twin.data["b"])))
    swapped = {(p.data["op"], p.data["b"], p.data["a"]) for p in task.problems("train")}
    assert not any((p.data["op"], p.data["a"], p.data["b"]) in swapped for p in test)


def test_training_evaluates_on_the_validation_split(tmp_path):
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        run = to_objects(compose(config_name="train", overrides=["experiment=smoke", "train.steps=1"]))
    trainer = Trainer(run, tmp_path)
    validation = {p.id for p in trainer.env.unwrapped.task.problems("validation")}
    assert trainer.eval_prompts and set(trainer.eval_prompts) <= validation
    assert trainer.eval_env.unwrapped.budget.config.window == len(trainer.eval_prompts)
    assert not validation & set(trainer.prompt_batch(1))
