"""fp32 master weights for a bf16 model (agents/precision.py): small steps are kept, micro-batch
gradients add up in fp32, and checkpoints store the full-precision state."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from agents.checkpoint import load_checkpoint, save_checkpoint
from agents.precision import adamw, trainable_parameters
from agents.trainer import Trainer
from tests.test_train_smoke import smoke_run

LR = 1e-5


def tiny_bf16_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(torch.bfloat16)


def loss_of(model: LlamaForCausalLM, seed: int) -> torch.Tensor:
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(seed))
    return model(input_ids=ids, labels=ids).loss


def changed_share(before: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    after = dict(trainable_parameters(model))
    changed = sum(int((after[name] != value).sum()) for name, value in before.items())
    return changed / sum(value.numel() for value in before.values())


def test_master_weights_keep_the_small_steps_that_bf16_weights_lose():
    plain, mastered = tiny_bf16_model(), tiny_bf16_model()
    start = {name: p.detach().clone() for name, p in trainable_parameters(plain)}
    plain_optimizer, none = adamw(plain, LR, (0.9, 0.999), 0.0, master_weights=False)
    optimizer, master = adamw(mastered, LR, (0.9, 0.999), 0.0, master_weights=True)
    assert none is None and master is not None
    for model, opt in ((plain, plain_optimizer), (mastered, optimizer)):
        loss_of(model, seed=1).backward()
        opt.step()
    # Stepping the bf16 weights themselves loses most of a step of 1e-5 to rounding ...
    assert changed_share(start, plain) < 0.5
    # ... the fp32 copies take all of it (AdamW's first step is lr x sign(grad) wherever grad != 0) ...
    for name, copy in master.tensors().items():
        moved = (copy - start[name].float()).abs()
        assert copy.dtype == torch.float32
        stepped = master.masters[name].grad != 0
        spacing = 4 * torch.finfo(torch.float32).eps * start[name].float().abs()
        assert torch.equal(moved > 0, stepped), name
        assert torch.all(moved <= 1.001 * LR + spacing), name
        assert float(moved[stepped].median()) == pytest.approx(LR, rel=0.02), name
    # ... and the model holds them rounded to bf16.
    for name, param in trainable_parameters(mastered):
        assert torch.equal(param, master.masters[name].to(torch.bfloat16)), name
    # After enough small steps the rounded model has moved where the plain bf16 one has not.
    for _ in range(30):
        for model, opt in ((plain, plain_optimizer), (mastered, optimizer)):
            opt.zero_grad(set_to_none=True)
            loss_of(model, seed=1).backward()
            opt.step()
    assert changed_share(start, mastered) > changed_share(start, plain) + 0.2


def test_micro_batch_gradients_add_up_in_fp32_on_the_copies():
    reference, mastered = tiny_bf16_model(), tiny_bf16_model()
    parts = []
    for seed in (1, 2):
        reference.zero_grad(set_to_none=True)
        loss_of(reference, seed).backward()
        parts.append({name: p.grad.float() for name, p in trainable_parameters(reference)})
    _, master = adamw(mastered, LR, (0.9, 0.999), 0.0, master_weights=True)
    loss_of(mastered, 1).backward()
    loss_of(mastered, 2).backward()
    for name, param in trainable_parameters(mastered):
        assert param.grad is None  # moved to the copy as soon as it was accumulated
        assert torch.equal(master.masters[name].grad, parts[0][name] + parts[1][name]), name


def test_a_checkpoint_stores_the_fp32_copies_and_restores_them_exactly(tmp_path):
    model = tiny_bf16_model()
    optimizer, master = adamw(model, LR, (0.9, 0.999), 0.0, master_weights=True)
    loss_of(model, 1).backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, model, optimizer, None, {}, keep_last=1, master=master)
    stored = load_file(str(path / "policy.safetensors"))
    assert all(value.dtype == torch.float32 for value in stored.values())

    fresh = tiny_bf16_model(seed=5)
    fresh_optimizer, fresh_master = adamw(fresh, LR, (0.9, 0.999), 0.0, master_weights=True)
    load_checkpoint(path, fresh, fresh_optimizer, None, fresh_master)
    for name, copy in master.tensors().items():
        assert torch.equal(fresh_master.masters[name].detach(), copy), name
        assert torch.equal(dict(trainable_parameters(fresh))[name], copy.to(torch.bfloat16)), name
    # The next step from the restored state is the step the original takes.
    for m, opt in ((model, optimizer), (fresh, fresh_optimizer)):
        opt.zero_grad(set_to_none=True)
        loss_of(m, 2).backward()
        opt.step()
    for name, copy in master.tensors().items():
        assert torch.equal(fresh_master.tensors()[name], copy), name


def test_the_trainer_uses_master_weights_only_for_a_bf16_device(tmp_path):
    # The format warm-up trains on copies of its own first: they must hand the model back to the trainer's.
    warmup = ["+warmup=format_sft", "warmup.steps=2", "warmup.batch_size=2"]
    bf16 = smoke_run(
        ["agent=gapg", "agent.filtering=false", "device.dtype=bfloat16", "train.steps=1", *warmup]
    )
    trainer = Trainer(bf16, tmp_path / "bf16")
    assert trainer.master is not None
    trainer.fit()
    for name, param in trainable_parameters(trainer.policy):
        assert torch.equal(param, trainer.master.masters[name].to(param.dtype)), name
    fp32 = smoke_run(["agent=gapg", "device.dtype=float32", "train.steps=1"])
    assert Trainer(fp32, tmp_path / "fp32").master is None
