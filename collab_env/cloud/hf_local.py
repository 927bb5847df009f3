"""The `transformers` oracle: any local Hugging Face model directory, generating in-process.

Prompts are batched and left-padded so each batch is one `generate` call; greedy decoding by
default makes the answers a function of the prompt, which is what the answer cache assumes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from collab_env.cloud.base import (
    SHARED_MODELS,
    AnswerCallback,
    CloudAnswer,
    CloudOracle,
    chat_messages,
    model_fingerprint,
)
from collab_env.cloud.settings import TransformersCloudConfig
from collab_env.config import CloudConfig
from collab_env.errors import CloudError
from collab_env.models import check_model_dir, resolve_dtype, tokenizer_from_dir
from collab_env.tasks import Problem, Task


def load_model(path: Path, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


class TransformersOracle(CloudOracle):
    """`generate` on a local model, `batch_size` prompts at a time, greedy unless temperature > 0."""

    config: TransformersCloudConfig

    @classmethod
    def check_config(cls, config: CloudConfig) -> None:
        check_model_dir(config.path, "cloud.path")  # type: ignore[attr-defined]

    def __init__(self, config: TransformersCloudConfig, task: Task) -> None:
        super().__init__(config, task)
        from transformers import GenerationConfig

        self.path = check_model_dir(config.path, "cloud.path").resolve()
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config.dtype, device)
        self.tokenizer = tokenizer_from_dir(str(self.path))
        self._fingerprint = model_fingerprint(self.path)
        # The fingerprint in the key keeps weights rebuilt at the same path from sharing the old copy.
        self._model_key = ("transformers", self.path, tuple(self._fingerprint), self.dtype, self.device)
        self.model = SHARED_MODELS.acquire(
            self._model_key, lambda: load_model(self.path, self.dtype, self.device)
        )
        sampling = config.temperature > 0
        self.generation = GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            do_sample=sampling,
            temperature=config.temperature if sampling else None,
            top_p=None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )

    @property
    def identity(self) -> dict[str, Any]:
        return {
            **super().identity,
            "path": str(self.path),
            "weights": self._fingerprint,
            "dtype": str(self.dtype),
            "max_new_tokens": self.config.max_new_tokens,
            "temperature": self.config.temperature,
            "seed": self.config.seed if self.config.temperature > 0 else None,
        }

    def _prompt(self, problem: Problem) -> str:
        messages = chat_messages(self, problem)
        if self.tokenizer.chat_template is None:
            return "\n\n".join(m["content"] for m in messages)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _generate(self, problems: Sequence[Problem]) -> list[CloudAnswer]:
        batch = self.tokenizer(
            [self._prompt(p) for p in problems],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        ).to(self.device)
        width = batch["input_ids"].shape[1]
        devices = [self.device] if self.device.type == "cuda" else []
        # Seeding inside fork_rng leaves the caller's random state (e.g. a training run's) untouched.
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(self.config.seed)
            output = self.model.generate(**batch, generation_config=self.generation)
        answers = []
        for row, prompt_tokens in zip(
            output[:, width:].tolist(), batch["attention_mask"].sum(1).tolist(), strict=True
        ):
            ends = [i for i, token in enumerate(row) if token == self.tokenizer.eos_token_id]
            completion = row[: ends[0] + 1] if ends else row
            text = self.tokenizer.decode(completion, skip_special_tokens=True)
            answers.append(CloudAnswer(text, prompt_tokens=prompt_tokens, completion_tokens=len(completion)))
        return answers

    def _answer(self, problems: Sequence[Problem], on_answer: AnswerCallback) -> list[CloudAnswer]:
        answers: list[CloudAnswer] = []
        for start in range(0, len(problems), self.config.batch_size):
            chunk = problems[start : start + self.config.batch_size]
            began = time.monotonic()
            try:
                fresh = self._generate(chunk)
            except RuntimeError as err:  # torch reports out-of-memory and device failures this way
                self.stats.errors += len(chunk)
                if self.config.on_error == "raise":
                    raise CloudError(
                        f"the transformers cloud model {self.path} failed on a batch of {len(chunk)}: {err}. "
                        f"The {len(answers)} answer(s) already generated are kept in the answer cache; "
                        "lower cloud.batch_size or set cloud.on_error=score_wrong."
                    ) from err
                fresh = [CloudAnswer(None, error=f"generation failed: {err}") for _ in chunk]
            else:
                self.stats.calls += len(chunk)
                self.stats.prompt_tokens += sum(a.prompt_tokens for a in fresh)
                self.stats.completion_tokens += sum(a.completion_tokens for a in fresh)
            self.stats.latency_s += time.monotonic() - began
            for offset, answer in enumerate(fresh):
                on_answer(start + offset, answer)
            answers.extend(fresh)
        return answers

    def close(self) -> None:
        if self.model is not None:
            SHARED_MODELS.release(self._model_key)
        self.model = None
