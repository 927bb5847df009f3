"""Data-parallel training over two gloo ranks on CPU: parameters stay identical on every rank, and a
two-rank update equals the single-process update of the same batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from agents import distributed
from agents.algorithm import update
from agents.batch import Rollout
from agents.config import TrainConfig
from agents.grpo import GRPOConfig
from agents.policy import Policy
from agents.registry import make_algorithm, register_configs, to_objects
from agents.trainer import Trainer
from collab_env.config import BudgetConfig

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
WORLD = 2


class _Vocabulary:
    """All a Policy needs of a tokenizer to score tokens: its length."""

    def __len__(self) -> int:
        return 64


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(config)


def fixed_update() -> dict[str, torch.Tensor]:
    """Parameters after one GRPO update (2 minibatches, micro-batches of 3) of a seeded tiny model on
    a seeded batch: 2 prompts x 4 completions of lengths 1-6."""
    policy = Policy(tiny_model(), _Vocabulary())
    n, prompt_len, completion_len = 8, 5, 6
    lengths = torch.tensor([1, 6, 3, 4, 2, 5, 6, 3])
    completion_mask = (torch.arange(completion_len)[None] < lengths[:, None]).float()
    attention = torch.cat([torch.ones(n, prompt_len), completion_mask], dim=1).long()
    batch = Rollout(
        prompt_ids=[0] * 4 + [1] * 4,
        groups=torch.arange(n) // 4,
        group_size=4,
        input_ids=torch.randint(0, 64, (n, prompt_len + completion_len)),
        attention_mask=attention,
        completion_mask=completion_mask,
        old_logprobs=-torch.rand(n, completion_len) * completion_mask,
        rewards=torch.tensor([1.0, 0.0, 0.3, 0.0, 0.0, 1.0, 1.0, 0.3]),
        infos=[{} for _ in range(n)],
    )
    train = TrainConfig(micro_batch_size=3, lr=0.5)
    algorithm = make_algorithm(GRPOConfig(minibatches=2), train, BudgetConfig(), 0, completion_len)
    prepared, _ = algorithm.prepare(batch, 1, policy, None)
    # Plain SGD: a parameter moves by lr x its gradient, so the comparison sees the gradients (Adam's
    # normalisation would blow float noise in near-zero gradients up to its step size).
    optimizer = torch.optim.SGD(policy.parameters(), lr=train.lr)
    update(algorithm, policy, optimizer, prepared, torch.Generator().manual_seed(0))
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def _rank(rank: int, port: int, run_dir: str, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)  # two ranks on a small shared machine
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        overrides = ["experiment=smoke", "agent=ppo", "agent.ent_coef=0.05", "train.device=cpu"]
        run = to_objects(compose(config_name="train", overrides=overrides))
    trainer = Trainer(run, run_dir)
    assert distributed.world_size() == WORLD and distributed.rank() == rank
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.fit()
    after = trainer.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed nothing"
    save_file({k: v.clone() for k, v in after.items()}, f"{out_dir}/trained_rank{rank}.safetensors")
    save_file(fixed_update(), f"{out_dir}/fixed_rank{rank}.safetensors")
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_train_identical_parameters(tmp_path):
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_rank, args=(_free_port(), str(run_dir), str(out_dir)), nprocs=WORLD, join=True)

    trained = [load_file(str(out_dir / f"trained_rank{r}.safetensors")) for r in range(WORLD)]
    for name, value in trained[0].items():
        assert torch.equal(value, trained[1][name]), name
    # Rank 0 alone writes the run's outputs.
    assert (run_dir / "final_metrics.json").exists() and (run_dir / "metrics.csv").exists()

    single = fixed_update()
    start = tiny_model().state_dict()
    assert max((single[f"model.{k}"] - v).abs().max() for k, v in start.items()) > 1e-3  # it moved
    for rank in range(WORLD):
        data_parallel = load_file(str(out_dir / f"fixed_rank{rank}.safetensors"))
        for name, value in single.items():
            torch.testing.assert_close(data_parallel[name], value, rtol=0, atol=1e-5, msg=name)


def test_shards_cover_the_prompts_in_order(monkeypatch):
    """The shares of the ranks, concatenated in rank order, are the prompts in their order."""
    prompts = list(range(7))
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append(distributed.shard(prompts))
    assert [len(s) for s in shares] == [3, 2, 2]
    assert sum(shares, []) == prompts


def test_concatenated_rollouts_keep_every_row():
    """Rollouts of different prompt and completion widths concatenate into the common layout."""

    def part(prompt_len: int, completion_len: int, seed: int) -> Rollout:
        generator = torch.Generator().manual_seed(seed)
        n = 4
        ids = torch.randint(3, 50, (n, prompt_len + completion_len), generator=generator)
        return Rollout(
            prompt_ids=[seed, seed, seed + 1, seed + 1],
            groups=torch.tensor([0, 0, 1, 1]),
            group_size=2,
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            completion_mask=torch.ones(n, completion_len),
            old_logprobs=-torch.rand(n, completion_len, generator=generator),
            rewards=torch.rand(n, generator=generator),
            infos=[{"row": i} for i in range(n)],
        )

    a, b = part(5, 3, 0), part(7, 2, 10)
    merged = distributed.concat_rollouts([a, b], pad_id=0)
    assert merged.input_ids.shape == (8, 7 + 3)
    assert merged.groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(merged.input_ids[:4, 2:7], a.input_ids[:, :5])  # prompt right-aligned
    assert torch.equal(merged.input_ids[:4, 7:], a.input_ids[:, 5:])
    assert torch.equal(merged.input_ids[4:, 7:9], b.input_ids[:, 7:])  # completion left-aligned
    assert merged.attention_mask[:4, :2].sum() == 0 and merged.completion_mask[4:, 2].sum() == 0
    assert torch.equal(merged.old_logprobs[4:, :2], b.old_logprobs)
    assert merged.prompt_ids == a.prompt_ids + b.prompt_ids and len(merged.infos) == 8
