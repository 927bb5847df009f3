"""Stable-Baselines3 adapters: PPO and MaskablePPO learn to route on DeviceCloudRouting-v0, PPO with an
LM policy runs updates on DeviceCloud-v0 with int64 token ids reaching the embedding."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gymnasium as gym
import pytest
import torch

from agents.config import RunConfig, TrainConfig
from agents.external import torch_threads
from agents.sb3 import SB3PPOConfig, build_model, lm_policy_class, train
from collab_env import ConfigError
from collab_env.config import DeviceConfig, EnvConfig, SimulatedCloudConfig, TaskConfig
from collab_env.routing_env import scripted_device

pytest.importorskip("stable_baselines3")
pytest.importorskip("sb3_contrib")

EASY = ("add2", "add2_carry", "mul21")
"""The scripted device is right on these levels and wrong on add3 and mul22 (40% of the prompts)."""
TINY_DEVICE = DeviceConfig(name="tiny-random", dtype="float32")


def routing_run(agent: object, tmp_path: Path) -> RunConfig:
    return RunConfig(
        task=TaskConfig(num_train=300, num_test=100),
        device=TINY_DEVICE,
        cloud=SimulatedCloudConfig(cache_path=str(tmp_path / "cloud.sqlite")),
        agent=agent,
        train=TrainConfig(eval_prompts=100, progress=False, device="cpu"),
    )


@pytest.mark.parametrize("algo", ["ppo", "maskable_ppo"])
def test_ppo_learns_to_route_better_than_random_on_held_out_prompts(algo, tmp_path):
    agent = SB3PPOConfig(algo=algo, features="ngrams", total_timesteps=2048, n_steps=64, batch_size=64)
    env_kwargs = {"device_answers": scripted_device(EASY), "cache_dir": str(tmp_path / "routing")}
    metrics = train(routing_run(agent, tmp_path), tmp_path / "run", env_kwargs=env_kwargs)
    # Same 100 held-out prompts, same cap (at most 30 cloud calls) for the policy and the baselines.
    assert metrics["eval/reward"] > metrics["baseline/random/reward"] + 0.05
    assert metrics["eval/reward"] > metrics["baseline/device_only/reward"]  # it routes, not only answers
    assert metrics["eval/cloud_rate"] <= 0.3
    assert metrics["eval/reward"] <= metrics["baseline/oracle/reward"] + 1e-9
    saved = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert saved["eval/reward"] == metrics["eval/reward"]
    weights = tmp_path / "run" / "sb3_policy.safetensors"
    assert (tmp_path / "run" / "progress.csv").is_file() and weights.is_file()
    # the same settings again: the finished fit is loaded, not trained again, and routes the same
    saved_at = weights.stat().st_mtime_ns
    assert train(routing_run(agent, tmp_path), tmp_path / "run", env_kwargs=env_kwargs) == metrics
    assert weights.stat().st_mtime_ns == saved_at
    # other settings: trained again
    other = dataclasses.replace(agent, total_timesteps=1024)
    train(routing_run(other, tmp_path), tmp_path / "run", env_kwargs=env_kwargs)
    assert weights.stat().st_mtime_ns != saved_at


def test_lm_policy_trains_on_the_token_env_with_int64_ids(make_env, tmp_path):
    from stable_baselines3.common.env_util import make_vec_env

    agent = SB3PPOConfig(env="token", n_envs=2, n_steps=8, batch_size=8, n_epochs=1, learning_rate=1e-4)
    run = RunConfig(
        device=TINY_DEVICE, env=EnvConfig(max_new_tokens=4), agent=agent, train=TrainConfig(device="cpu")
    )
    vec_env = make_vec_env(lambda: make_env(device=TINY_DEVICE, max_new_tokens=4), n_envs=2, seed=0)
    with torch_threads(1):
        model = build_model(run, vec_env)
        policy = model.policy
        assert isinstance(policy, lm_policy_class())
        assert policy.action_net.lm_head is policy.lm.get_output_embeddings()  # the LM head, no fresh Linear
        seen = []
        policy.lm.get_input_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
        before = {name: p.detach().clone() for name, p in policy.named_parameters()}
        model.learn(total_timesteps=32)
    assert seen and set(seen) == {torch.int64}
    changed = {name for name, p in policy.named_parameters() if not torch.equal(before[name], p)}
    assert any(name.startswith("features_extractor.net.lm.") for name in changed)
    assert any("help" in name for name in changed)
    assert (
        model.logger.name_to_value["train/n_updates"] == 2
    )  # 32 steps = 2 rollouts of 2 x 8, one epoch each
    obs = vec_env.reset()
    assert obs["input_ids"].dtype.name == "int64"
    logits = policy.action_net(policy.extract_features(policy.obs_to_tensor(obs)[0]))
    assert logits.shape == (2, vec_env.action_space.n) == (2, len(vec_env.get_attr("tokenizer")[0]) + 1)


def test_train_on_the_token_env_evaluates_held_out_prompts(tmp_path):
    agent = SB3PPOConfig(env="token", n_envs=1, n_steps=8, batch_size=8, n_epochs=1, total_timesteps=8)
    run = RunConfig(
        task=TaskConfig(num_train=8, num_test=4),
        device=TINY_DEVICE,
        env=EnvConfig(max_new_tokens=3),
        cloud=SimulatedCloudConfig(cache_path=":memory:"),
        agent=agent,
        train=TrainConfig(eval_prompts=2, progress=False, device="cpu"),
    )
    metrics = train(run, tmp_path)
    assert metrics["eval/tokens_per_answer"] > 0
    assert 0.0 <= metrics["eval/reward"] <= 1.0
    assert not any(key.startswith("baseline/") for key in metrics)  # routers only make sense on routing


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"env": "tokens"}, "agent.env"),
        ({"algo": "maskable_ppo", "env": "token"}, "needs agent.env=routing"),
        ({"features": "bert"}, "agent.features"),
        ({"batch_size": 1024}, "exceeds a rollout"),
        ({"gamma": 0.0}, "agent.gamma"),
    ],
)
def test_bad_settings_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        SB3PPOConfig(**fields)


def test_hydra_agent_option_builds_the_config():
    from hydra import compose, initialize_config_dir

    from agents.registry import register_configs, to_objects

    register_configs()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(
            config_name="train", overrides=["experiment=smoke", "agent=sb3_ppo", "agent.algo=maskable_ppo"]
        )
    run = to_objects(cfg)
    assert isinstance(run.agent, SB3PPOConfig)
    assert (run.agent.algo, run.agent.env, run.agent.net_arch) == ("maskable_ppo", "routing", [64, 64])


def test_env_kwargs_are_refused_for_the_token_env(tmp_path):
    agent = SB3PPOConfig(env="token")
    with pytest.raises(ConfigError, match="routing env only"):
        train(RunConfig(device=TINY_DEVICE, agent=agent), tmp_path, env_kwargs={"features": "ngrams"})
    assert gym.spec("DeviceCloudRouting-v0").entry_point == "collab_env.routing_env:DeviceCloudRoutingEnv"
