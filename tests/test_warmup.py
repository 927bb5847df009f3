"""agents.tiny_arith and agents.supervised: tiny-arith is built deterministically, cached per recipe, and plays DeviceCloud-v0;
the recipe and the format warm-up are checked; the shared-prefix loss equals a plain forward."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import agents.supervised as supervised
import agents.tiny_arith as tiny_arith
from agents.config import FormatWarmupConfig, RolloutConfig
from agents.evaluation import evaluate_policy
from agents.policy import Policy
from collab_env import ConfigError, DeviceConfig, TaskConfig
from collab_env.models import load_model, load_tokenizer, smollm2_tokenizer_dir, tiny_llama_config

TASK = TaskConfig(num_train=40, num_test=10)
SHAPE = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}


def tiny(**recipe) -> DeviceConfig:
    return DeviceConfig(name="tiny-arith", **SHAPE, recipe={"steps": 3, "batch_size": 4, **recipe})


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer files, extracted once (the user cache may hold the whole model: skip weights)."""
    folder = tmp_path_factory.mktemp("tokenizer") / "smollm2-135m-instruct-tokenizer"
    shutil.copytree(smollm2_tokenizer_dir(), folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch, tokenizer_files) -> Path:
    """A fresh DEVICECLOUD_CACHE holding only the tokenizer."""
    monkeypatch.setenv("DEVICECLOUD_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tokenizer_files, tmp_path / "cache" / "models" / tokenizer_files.name)
    return tmp_path / "cache"


def test_recipe_rejects_unknown_keys_and_bad_values(cache):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stepz'\].*Valid keys: .*steps"):
        tiny_arith.ensure_tiny_arith(tiny(stepz=3), TASK)
    with pytest.raises(ConfigError, match="device.recipe.marker_fraction"):
        tiny_arith.ensure_tiny_arith(tiny(marker_fraction=1.5), TASK)
    with pytest.raises(ConfigError, match=r"device.recipe.levels.*no level\(s\) \['add4'\]"):
        tiny_arith.ensure_tiny_arith(tiny(levels=["add2", "add4"]), TASK)
    with pytest.raises(ConfigError, match=r"device.recipe.extra_templates.*answer_tags"):
        tiny_arith.ensure_tiny_arith(tiny(extra_templates=["boxed"]), TASK)
    assert not list((cache / "models").glob("tiny-arith-*"))


def test_build_is_deterministic_cached_and_keyed_by_recipe(cache, tmp_path, monkeypatch):
    built = tiny_arith.ensure_tiny_arith(tiny(), TASK)
    folder = Path(built.path)
    assert built.name == "tiny-arith" and folder.parent == cache / "models"
    record = json.loads((folder / "recipe.json").read_text())
    assert len(record["build"]["losses"]) == 3 and record["recipe"]["steps"] == 3
    assert not list(folder.parent.glob("*.tmp-*"))
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a cached model was rebuilt")

    with monkeypatch.context() as patch:
        patch.setattr(tiny_arith, "build_tiny_arith", no_rebuild)
        assert tiny_arith.ensure_tiny_arith(tiny(), TASK).path == built.path
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp

    changed = tiny_arith.ensure_tiny_arith(tiny(lr=1e-3), TASK)
    assert changed.path != built.path and Path(changed.path).is_dir()
    assert tiny_arith.ensure_tiny_arith(tiny(), TaskConfig(num_train=40, num_test=12)).path not in (
        built.path,
        changed.path,
    )

    # The same recipe in another cache: the same loss curve and the same weights.
    other = tmp_path / "other"
    shutil.copytree(
        cache / "models" / "smollm2-135m-instruct-tokenizer",
        other / "models" / "smollm2-135m-instruct-tokenizer",
    )
    monkeypatch.setenv("DEVICECLOUD_CACHE", str(other))
    again = Path(tiny_arith.ensure_tiny_arith(tiny(), TASK).path)
    assert again.parent == other / "models" and again.name == folder.name
    assert json.loads((again / "recipe.json").read_text())["build"]["losses"] == record["build"]["losses"]
    first, second = load_file(folder / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("marker_fraction", [0.0, 1.0])
def test_built_model_loads_and_plays_the_env(cache, marker_fraction):
    device = tiny_arith.ensure_tiny_arith(
        DeviceConfig(
            name="tiny-arith",
            **SHAPE,
            recipe={"steps": 80, "batch_size": 16, "lr": 1e-2, "marker_fraction": marker_fraction},
        ),
        TASK,
    )
    model = load_model(DeviceConfig(name="tiny-arith", path=device.path, dtype="float32"))
    assert model.config.tie_word_embeddings and model.config.vocab_size == 49152
    env = gym.make(
        "DeviceCloud-v0", task=TASK, device=device, cloud={"name": "simulated", "cache_path": ":memory:"}
    )
    test = [p.id for p in env.unwrapped.task.problems("test")]
    result = evaluate_policy(Policy(model, load_tokenizer(device)), env, test, RolloutConfig(), max_batch=16)
    if marker_fraction == 1.0:
        assert all(info["called_help"] for info in result.infos)
    else:  # the answer format is learnt in a few steps, whatever the digits
        assert all(info["local_answer"] is not None and not info["called_help"] for info in result.infos)


def test_compact_shared_prefix_loss_equals_the_full_models_plain_forward(cache):
    from transformers import AutoModelForCausalLM

    env = supervised.prompt_env(TASK, DeviceConfig(name="tiny-random"))
    data = supervised.SupervisedData(env, env.unwrapped.task.problems("train"), marker_fraction=0.5)
    batch = data.draw(6, np.random.default_rng(0))
    assert any(batch.markers) and not all(batch.markers)
    vocabulary = supervised.CompactVocabulary.of(data.token_ids(), data.vocab_size)
    tokenizer = load_tokenizer("tiny-random")
    device = DeviceConfig(name="tiny-arith", **SHAPE)
    torch.manual_seed(0)
    special = vocabulary.special_tokens(tokenizer)
    assert vocabulary.ids[special.pad_token_id] == tokenizer.pad_token_id
    compact = AutoModelForCausalLM.from_config(tiny_llama_config(device, len(vocabulary.ids), special))
    full = vocabulary.expand(compact, tiny_llama_config(device, len(tokenizer), tokenizer))
    weight = full.get_input_embeddings().weight
    assert full.get_output_embeddings().weight is weight
    assert torch.equal(weight[vocabulary.ids], compact.get_input_embeddings().weight)
    assert not weight[vocabulary.index == -1].any()

    rows = torch.cat([batch.prefix.expand(len(batch.input_ids), -1), batch.input_ids], dim=1)
    logits = full(input_ids=rows).logits[:, len(batch.prefix) :].float()
    predicts = batch.labels != -100
    plain = torch.nn.functional.cross_entropy(logits[predicts], batch.labels[predicts])
    assert torch.allclose(supervised.completion_loss(full, batch), plain, atol=1e-5)
    compacted = supervised.completion_loss(compact, vocabulary.compact(batch), vocabulary.log_zero_rows)
    assert torch.allclose(compacted, plain, atol=1e-5)


def test_format_warmup_lowers_the_loss_and_is_a_hydra_option(cache):
    from hydra import compose, initialize_config_dir

    from agents.config import RunConfig
    from agents.registry import register_configs, to_objects

    register_configs()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(
            config_name="train", overrides=["experiment=smoke", "+warmup=format_sft", "warmup.steps=8"]
        )
    run = to_objects(cfg)
    assert isinstance(run.warmup, FormatWarmupConfig) and run.warmup.steps == 8
    run = RunConfig(
        task=TASK,
        device=DeviceConfig(name="tiny-random", **SHAPE),
        warmup={"steps": 8, "batch_size": 8, "lr": 1e-2},
    )
    policy = Policy.load(run.device)
    before = [p.detach().clone() for p in policy.model.parameters()]
    losses = supervised.format_warmup(policy, run)
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0]
    after = list(policy.model.parameters())
    assert all(p.requires_grad for p in after) and not policy.model.training  # still trainable, mode kept
    assert not all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    with pytest.raises(ConfigError, match="warmup.marker_fraction"):
        FormatWarmupConfig(marker_fraction=-0.1)
