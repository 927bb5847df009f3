"""Device models: the tiny random model, the embedded tokenizer, and clear errors for bad paths."""

from __future__ import annotations

import pytest
import torch

from collab_env import ModelNotFoundError
from collab_env.models import load_model, load_tokenizer


def test_tiny_random_model_uses_the_smollm2_tokenizer():
    tokenizer = load_tokenizer("tiny-random")
    model = load_model({"name": "tiny-random", "dtype": "float32"})
    assert model.config.vocab_size == len(tokenizer) == 49152
    ids = torch.tensor([tokenizer.encode("Calculate 2 + 3.")])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    again = load_model({"name": "tiny-random", "dtype": "float32"})
    assert torch.equal(next(model.parameters()), next(again.parameters()))  # seeded


def test_missing_and_corrupt_model_dirs_are_clear(tmp_path):
    with pytest.raises(ModelNotFoundError, match="is not a directory"):
        load_model({"name": "path", "path": str(tmp_path / "nope")})
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model({"name": "path", "path": str(tmp_path)})
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 10}')
    with pytest.raises(ModelNotFoundError, match="could not load"):
        load_model({"name": "path", "path": str(tmp_path)})
    with pytest.raises(ModelNotFoundError, match="agents.warmup"):
        load_model("tiny-arith")


def test_saved_tiny_model_loads_from_a_directory(tmp_path):
    model = load_model({"name": "tiny-random", "dtype": "float32"})
    model.save_pretrained(tmp_path)
    load_tokenizer("tiny-random").save_pretrained(tmp_path)
    loaded = load_model({"name": "path", "path": str(tmp_path), "dtype": "float32"})
    assert torch.equal(next(model.parameters()), next(loaded.parameters()))
