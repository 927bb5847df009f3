"""Tianshou 2.x adapter: PPO learns to route on DeviceCloudRouting-v0, and runs updates on DeviceCloud-v0
with the LM actor-critic, int64 token ids reaching the embedding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agents.config import RunConfig, TrainConfig
from agents.external import torch_threads
from agents.tianshou import DropInfo, TianshouPPOConfig, TokenActor, build_algorithm, policy_act, train
from collab_env import ConfigError
from collab_env.config import DeviceConfig, EnvConfig, SimulatedCloudConfig, TaskConfig
from collab_env.routing_env import scripted_device

pytest.importorskip("tianshou")

EASY = ("add2", "add2_carry", "mul21")
"""The scripted device is right on these levels and wrong on add3 and mul22 (40% of the prompts)."""
TINY_DEVICE = DeviceConfig(name="tiny-random", dtype="float32")


def test_ppo_learns_to_route_better_than_random_on_held_out_prompts(tmp_path):
    agent = TianshouPPOConfig(features="ngrams", max_epochs=3, epoch_num_steps=1024)
    run = RunConfig(
        task=TaskConfig(num_train=300, num_test=100),
        device=TINY_DEVICE,
        cloud=SimulatedCloudConfig(cache_path=str(tmp_path / "cloud.sqlite")),
        agent=agent,
        train=TrainConfig(eval_prompts=100, progress=False, device="cpu"),
    )
    env_kwargs = {"device_answers": scripted_device(EASY), "cache_dir": str(tmp_path / "routing")}
    metrics = train(run, tmp_path / "run", env_kwargs=env_kwargs)
    # Same 100 held-out prompts, same cap (at most 30 cloud calls) for the policy and the baselines.
    assert metrics["eval/reward"] > metrics["baseline/random/reward"] + 0.05
    assert metrics["eval/reward"] > metrics["baseline/device_only/reward"]  # it routes, not only answers
    assert metrics["eval/cloud_rate"] <= 0.3
    saved = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert saved["eval/reward"] == metrics["eval/reward"]
    weights = tmp_path / "run" / "tianshou_policy.safetensors"
    state = load_file(weights)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    # the same settings again: the finished fit is loaded, not trained again, and routes the same
    saved_at = weights.stat().st_mtime_ns
    assert train(run, tmp_path / "run", env_kwargs=env_kwargs) == metrics
    assert weights.stat().st_mtime_ns == saved_at


def test_lm_actor_critic_runs_ppo_updates_on_the_token_env(make_env):
    from tianshou.data import Collector, CollectStats, VectorReplayBuffer
    from tianshou.env import DummyVectorEnv
    from tianshou.trainer import OnPolicyTrainerParams

    agent = TianshouPPOConfig(env="token", n_envs=2, batch_size=4, update_step_num_repetitions=1, lr=1e-4)
    run = RunConfig(
        device=TINY_DEVICE, env=EnvConfig(max_new_tokens=4), agent=agent, train=TrainConfig(device="cpu")
    )
    envs = DummyVectorEnv([lambda: DropInfo(make_env(device=TINY_DEVICE, max_new_tokens=4))] * 2)
    envs.seed(0)
    probe = make_env(device=TINY_DEVICE, max_new_tokens=4)
    with torch_threads(1):
        algorithm = build_algorithm(run, probe)
        actor = algorithm.policy.actor
        assert isinstance(actor, TokenActor)
        net = actor.net
        assert algorithm.critic.net is net  # one LM shared by actor and critic
        seen = []
        net.lm.get_input_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
        before = {name: p.detach().clone() for name, p in net.named_parameters()}
        collector = Collector[CollectStats](algorithm, envs, VectorReplayBuffer(16, 2))
        algorithm.run_training(
            OnPolicyTrainerParams(
                training_collector=collector,
                max_epochs=1,
                epoch_num_steps=16,
                collection_step_num_env_steps=8,
                update_step_num_repetitions=1,
                batch_size=4,
                verbose=False,
                show_progress=False,
            )
        )
        obs, _ = probe.reset(seed=0)
        algorithm.policy.eval()
        action = policy_act(algorithm.policy)(obs, 0)
    assert seen and set(seen) == {torch.int64}
    changed = {name for name, p in net.named_parameters() if not torch.equal(before[name], p)}
    assert any(name.startswith("lm.") for name in changed)
    assert {"value_head.0.weight", "policy_head.help.bias"} <= changed
    assert 0 <= action <= probe.unwrapped.help_action
    assert isinstance(obs["input_ids"], np.ndarray) and obs["input_ids"].dtype == np.int64


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"env": "tokens"}, "agent.env"),
        ({"features": "bert"}, "agent.features"),
        ({"collection_step_num_env_steps": 2, "n_envs": 4}, "at least agent.n_envs"),
        ({"eps_clip": 0.0}, "agent.eps_clip=0.0 must be positive"),
        ({"num_threads": -1}, "agent.num_threads"),
    ],
)
def test_bad_settings_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        TianshouPPOConfig(**fields)


def test_hydra_agent_option_builds_the_config():
    from hydra import compose, initialize_config_dir

    from agents.registry import register_configs, to_objects

    register_configs()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(
            config_name="train", overrides=["experiment=smoke", "agent=tianshou_ppo", "agent.env=token"]
        )
    run = to_objects(cfg)
    assert isinstance(run.agent, TianshouPPOConfig)
    assert (run.agent.env, run.agent.hidden_sizes, run.agent.update_step_num_repetitions) == (
        "token",
        [64, 64],
        10,
    )
