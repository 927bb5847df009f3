"""TRL integration: `EnvReward` scores completions exactly as the env does (rewards, infos, budget), and
examples/trl_grpo.py trains a tiny random model with TRL's GRPOTrainer on it, the rewards TRL saw being
the env's `score()` of the same completions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from conftest import encode, play

from collab_env import HELP_MARKER, ConfigError
from collab_env.integrations.trl import EnvReward, batch_metrics
from collab_env.tasks import to_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = {"name": "tiny-random", "dtype": "float32"}
TASK = {"name": "arithmetic", "num_train": 20, "num_test": 20}  # examples/trl_grpo.py --train-prompts 20


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scripted_completions(env: gym.Env) -> tuple[list[int], list[list[int]]]:
    """Prompt ids and completions covering every outcome: right, wrong, help, help past the answer, EOS."""
    unwrapped = env.unwrapped
    eos = int(unwrapped.tokenizer.eos_token_id)
    prompt_ids, completions = [], []
    for problem in unwrapped.task.problems("train")[:12]:
        wrong = str(int(problem.answer) + 1)
        for text in (
            f"<answer>{problem.answer}</answer>",
            f"<think>x</think><answer>{wrong}</answer>",
            HELP_MARKER,
        ):
            prompt_ids.append(problem.id)
            completions.append([*encode(env, text), eos, *encode(env, " trailing tokens")])
    return prompt_ids, completions


@pytest.mark.parametrize(
    "budget", [{"mode": "train"}, {"mode": "cap", "window": 8}, {"mode": "penalty", "penalty": 0.1}]
)
def test_rewards_infos_and_budget_equal_stepping_the_same_completions(make_env, budget):
    scored, stepped = make_env(budget=budget), make_env(budget=budget)
    reward = EnvReward(scored)
    prompt_ids, completions = scripted_completions(scored)
    rewards = reward(prompts=None, completions=None, completion_ids=completions, prompt_id=prompt_ids)
    expected = []
    for prompt_id, tokens in zip(prompt_ids, completions, strict=True):
        stepped.reset(options={"prompt_id": prompt_id})
        step_reward, _, _, step_info = play(stepped, tokens)
        expected.append((step_reward, step_info))
    assert rewards == [r for r, _ in expected] == reward.last_rewards
    assert reward.last_infos == [i for _, i in expected]
    budget_scored, budget_stepped = scored.unwrapped.budget, stepped.unwrapped.budget
    assert (budget_scored.calls, budget_scored.episodes) == (budget_stepped.calls, budget_stepped.episodes)
    assert budget_scored.episodes == len(completions) or budget.get("window")
    assert {i["outcome"] for i in reward.last_infos} >= {"local_correct", "wrong", "cloud_correct"}
    if budget["mode"] == "cap":
        assert "over_budget" in {i["outcome"] for i in reward.last_infos}
    stats = reward.stats()
    assert stats["completions"] == len(completions)
    assert stats["call_rate"] == pytest.approx(sum(i["called_cloud"] for _, i in expected) / len(expected))
    assert (stats["budget/calls"], stats["budget/episodes"]) == (budget_scored.calls, budget_scored.episodes)


def test_text_completions_are_retokenized_and_logged_through_trl_hooks(make_env):
    env = make_env()
    reward = EnvReward(env)
    problem = env.unwrapped.task.problems("train")[0]
    texts = [f"<answer>{problem.answer}</answer>", HELP_MARKER]
    conversational = [[{"role": "assistant", "content": t}] for t in texts]
    logged, extra = {}, {}
    rewards = reward(
        completions=conversational,
        prompt_id=[problem.id, problem.id],
        log_metric=logged.__setitem__,
        log_extra=extra.__setitem__,
        trainer_state=None,
        answer=[problem.answer] * 2,
    )
    fresh = make_env()
    assert rewards == [fresh.unwrapped.score(problem.id, encode(fresh, t))[0] for t in texts]
    assert reward(completions=texts, prompt_id=[problem.id] * 2) == rewards
    assert logged == batch_metrics(reward.last_infos)
    assert logged["devicecloud/outcome/local_correct"] == 0.5 and logged["devicecloud/help_rate"] == 0.5
    assert extra == {"outcome": [i["outcome"] for i in reward.last_infos]}


def test_ids_beyond_the_tokenizer_are_dropped_and_a_missing_prompt_id_column_is_named(make_env):
    env = make_env()
    reward = EnvReward(env)
    problem = env.unwrapped.task.problems("train")[0]
    vocab = env.unwrapped.help_action  # a model's spare embedding rows start here: not text, not help
    ids = [vocab, *encode(env, f"<answer>{problem.answer}</answer>"), vocab + 5]
    assert reward(completion_ids=[ids], prompt_id=[problem.id]) == [1.0]
    assert not reward.last_infos[0]["called_help"] and reward.stats()["dropped_tokens"] == 2
    with pytest.raises(ConfigError, match="prompt_id"):
        reward(completion_ids=[ids])
    with pytest.raises(ConfigError, match="DeviceCloud-v0"):
        EnvReward(object())


def example_argv(tmp_path: Path, cloud_cache: str, steps: int, prompts: int, *extra: str) -> list[str]:
    """The command line of examples/trl_grpo.py on the tiny random device: 4 generations of <= 16
    tokens per prompt, 20 training prompts (TASK), the test's cloud cache."""
    return [
        *("--device", "tiny-random", "--steps", str(steps), "--prompts", str(prompts)),
        *("--generations", "4", "--max-new-tokens", "16", "--train-prompts", "20"),
        *("--output-dir", str(tmp_path / "trl"), "--cloud-cache", cloud_cache),
        *extra,
    ]


def script_generation(monkeypatch, example, cloud_cache: str) -> None:
    """Make the example's tiny random model answer something: it never answers right by itself, so 3
    of every 4 rows TRL samples are rewritten as a right answer, a call for help and a wrong answer
    (then EOS), and the rewards and advantages TRL trains on are not all 0. TRL still tokenizes,
    masks, scores, logs and backpropagates them as its own samples."""
    env = gym.make(
        "DeviceCloud-v0", task=TASK, device=TINY, cloud={"name": "simulated", "cache_path": cloud_cache}
    )
    by_prompt = {
        tuple(env.unwrapped.prompt_tokens(p.id).tolist()): p for p in env.unwrapped.task.problems("train")
    }
    tokenizer = env.unwrapped.tokenizer
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)

    def scripted(model):
        generate = model.generate

        def wrapped(*args, **kwargs):
            out = generate(*args, **kwargs)
            inputs, mask = kwargs["input_ids"], kwargs["attention_mask"].bool()
            rows = []
            for row, sampled in enumerate(out[:, inputs.shape[1] :].tolist()):
                # A KeyError here would mean that TRL's prompt tokens are not the env's.
                problem = by_prompt[tuple(inputs[row][mask[row]].tolist())]
                wrong = str(int(problem.answer) + 3)
                texts = [f"<answer>{problem.answer}</answer>", HELP_MARKER, f"<answer>{wrong}</answer>"]
                if row % 4 < 3:
                    sampled = [*tokenizer.encode(texts[row % 4], add_special_tokens=False), eos]
                rows.append(sampled)
            width = max(map(len, rows))
            completions = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            return torch.cat([inputs, completions], dim=1)

        model.generate = wrapped
        return model

    load_model = example.load_model
    monkeypatch.setattr(example, "load_model", lambda config: scripted(load_model(config)))


def test_trl_grpo_example_trains_and_trl_sees_the_env_rewards(tmp_path, cloud_cache, monkeypatch):
    pytest.importorskip("trl")
    example = load_example("trl_grpo")
    script_generation(monkeypatch, example, cloud_cache)
    batches = []

    class Recording(EnvReward):
        def __call__(self, **kwargs):
            rewards = super().__call__(**kwargs)
            batches.append(
                (list(kwargs["prompt_id"]), self.last_completion_ids, rewards, dict(self.last_metrics))
            )
            return rewards

    monkeypatch.setattr(example, "EnvReward", Recording)
    trainer, reward = example.main(example_argv(tmp_path, cloud_cache, steps=2, prompts=1))

    assert len(batches) == 2  # one generation batch per step
    fresh = gym.make(
        "DeviceCloud-v0",
        task=TASK,
        device=TINY,
        cloud={"name": "simulated", "cache_path": cloud_cache},
        max_new_tokens=16,
    ).unwrapped
    logged = [entry for entry in trainer.state.log_history if "rewards/devicecloud/mean" in entry]
    assert len(logged) == 2
    for (prompt_ids, completion_ids, rewards, metrics), entry in zip(batches, logged, strict=True):
        assert rewards == [fresh.score(p, ids)[0] for p, ids in zip(prompt_ids, completion_ids, strict=True)]
        assert entry["rewards/devicecloud/mean"] == pytest.approx(sum(rewards) / len(rewards))
        for key, value in metrics.items():
            assert entry[key] == pytest.approx(value), key
    # TRL's own record of the last batch's rewards is ours, completion by completion.
    assert list(trainer._logs["rewards"]["devicecloud"]) == pytest.approx(batches[-1][2])
    assert {r for batch in batches for r in batch[2]} >= {0.0, 1.0}
    assert reward.stats()["help_rate"] > 0
    budget = reward.env.budget
    assert (
        (budget.calls, budget.episodes)
        == (fresh.budget.calls, fresh.budget.episodes)
        == (
            sum(round(m["devicecloud/call_rate"] * 4) for *_, m in batches),
            8,
        )
    )
    assert to_dataset(reward.env.task, "train")["prompt_id"] == [
        p.id for p in reward.env.task.problems("train")
    ]
