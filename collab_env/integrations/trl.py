"""DeviceCloud-v0's reward as a TRL reward function: `EnvReward` for `trl.GRPOTrainer(reward_funcs=...)`.

    import gymnasium as gym, collab_env
    from collab_env.integrations.trl import EnvReward
    from collab_env.tasks import to_dataset
    from trl import GRPOConfig, GRPOTrainer

    env = gym.make("DeviceCloud-v0", device="smollm2", max_new_tokens=64)
    reward = EnvReward(env)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, train_dataset=to_dataset(env.unwrapped.task),
                          args=GRPOConfig(max_completion_length=64, ...), processing_class=tokenizer)

Every completion is scored by the env's own `score_many`, the code that ends `step`: the same marker
detection, answer extraction and verifier, the same cloud oracle and its cache, and the same budget
window (each completion counts as one episode, each admitted call as one call). Nothing here imports
TRL: the reward function is a plain callable with TRL's signature.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from collab_env.errors import ConfigError
from collab_env.scoring import OUTCOMES

METRIC_PREFIX = "devicecloud/"


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string (standard format) or a list of messages (conversational),
    of which the assistant's contents are joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence):
        return "".join(
            str(m.get("content") or "")
            for m in completion
            if isinstance(m, dict) and m.get("role", "assistant") == "assistant"
        )
    raise ConfigError(
        f"a completion must be a string or a list of chat messages, got {type(completion).__name__}."
    )


def batch_metrics(infos: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Shares over the scored completions: call_rate (reached the cloud), help_rate (called for help,
    before the cap), accuracy, local_accuracy, and the share of each outcome (`outcome/<name>`)."""
    n = max(len(infos), 1)
    metrics = {
        "call_rate": sum(bool(i["called_cloud"]) for i in infos) / n,
        "help_rate": sum(bool(i["called_help"]) for i in infos) / n,
        "accuracy": sum(bool(i["correct"]) for i in infos) / n,
        "local_accuracy": sum(bool(i["local_correct"]) for i in infos) / n,
    }
    outcomes = Counter(i["outcome"] for i in infos)
    metrics.update({f"outcome/{name}": outcomes[name] / n for name in OUTCOMES})
    return {METRIC_PREFIX + key: value for key, value in metrics.items()}


class EnvReward:
    """A reward function for TRL's GRPOTrainer that scores completions through a `DeviceCloud-v0` env.

    TRL calls it as `reward(prompts=..., completions=..., completion_ids=..., **columns)`, where
    `columns` are the dataset's other columns (one value per completion) plus `trainer_state`,
    `log_metric` and `log_extra` (TRL 1.16); it returns one float per completion.

    - Prompts are named by the dataset column `prompt_id` (`collab_env.tasks.to_dataset` makes it), which
      must be the env's task's ids: build the dataset from `env.unwrapped.task`.
    - Tokens: with `completion_ids` (what TRL passes) the sampled token ids are scored as they are,
      which is exact when the policy's tokenizer is the env's (`device=` the model's tokenizer). Ids
      outside the env's vocabulary (padding rows of a model's embedding beyond the tokenizer) carry no
      text and are dropped (counted in `stats()["dropped_tokens"]`). Without `completion_ids` the
      completion text is re-tokenized with the env's tokenizer, which can split text differently from
      the sampled tokens (the marker is still found, as on text, with `marker_match="lenient"`).
    - Tokens after the first stop (EOS, the marker, the end of the answer) are ignored, and so are tokens
      past the env's `max_new_tokens`: set TRL's `max_completion_length` to the env's `max_new_tokens`.
    - Budget: each completion is one episode of `env.unwrapped.budget`'s window and each admitted call
      one call, exactly as if the completion had been stepped through the env (in mode `cap`, calls
      beyond the budget are refused and scored on the local answer, in order).
    - Metrics: when TRL passes `log_metric`, the batch's `batch_metrics` (call rate, help rate, accuracy,
      outcome shares, each under `devicecloud/`) are logged with TRL's own metrics, and `log_extra`
      adds an `outcome` column to TRL's completions table. Without them (other trainers), read
      `last_metrics` (the last batch) or `stats()` (everything scored so far).
    - `last_rewards`, `last_infos` and `last_completion_ids` hold the last batch's rewards, the env's
      infos and the token ids scored, in TRL's order (a prompt's `num_generations` completions are
      consecutive): what `agents.gapg.select_prompts` needs (docs/integrations.md).
    """

    def __init__(self, env: Any, name: str = "devicecloud", prompt_id_column: str = "prompt_id") -> None:
        base = getattr(env, "unwrapped", env)
        if not callable(getattr(base, "score_many", None)):
            raise ConfigError(
                f"EnvReward needs a DeviceCloud-v0 env (with score_many), got {type(base).__name__}: "
                'use gym.make("DeviceCloud-v0", ...).'
            )
        self.env = base
        self.__name__ = name  # what TRL names the reward in its logs: rewards/<name>/mean
        self.prompt_id_column = prompt_id_column
        self.vocab_size = len(base.tokenizer)
        self.last_rewards: list[float] = []
        self.last_infos: list[dict[str, Any]] = []
        self.last_completion_ids: list[list[int]] = []
        self.last_metrics: dict[str, float] = {}
        self._totals: Counter[str] = Counter()

    def tokens(
        self, completions: Sequence[Any] | None, completion_ids: Sequence[Sequence[int]] | None
    ) -> list[list[int]]:
        """The token ids that are scored: `completion_ids` within the vocabulary, else the re-tokenized text."""
        if completion_ids is not None:
            kept = [[int(t) for t in ids if 0 <= int(t) < self.vocab_size] for ids in completion_ids]
            self._totals["dropped_tokens"] += sum(len(ids) for ids in completion_ids) - sum(map(len, kept))
            return kept
        if completions is None:
            raise ConfigError("EnvReward needs completion_ids or completions.")
        encode = self.env.tokenizer.encode
        return [encode(completion_text(c), add_special_tokens=False) for c in completions]

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        log_extra: Callable[[str, list[Any]], None] | None = None,
        **columns: Any,
    ) -> list[float]:
        prompt_ids = columns.get(self.prompt_id_column)
        if prompt_ids is None:
            raise ConfigError(
                f"EnvReward needs the dataset column {self.prompt_id_column!r} (the env's prompt ids): build "
                "the dataset with collab_env.tasks.to_dataset(env.unwrapped.task, split)."
            )
        tokens = self.tokens(completions, completion_ids)
        if len(tokens) != len(prompt_ids):
            raise ConfigError(f"{len(tokens)} completions but {len(prompt_ids)} prompt ids.")
        results = self.env.score_many([int(p) for p in prompt_ids], tokens)
        self.last_completion_ids = tokens
        self.last_rewards = [float(r) for r, _ in results]
        self.last_infos = [info for _, info in results]
        self.last_metrics = batch_metrics(self.last_infos)
        self._totals["completions"] += len(results)
        for info in self.last_infos:
            self._totals["outcome/" + info["outcome"]] += 1
            self._totals["calls"] += bool(info["called_cloud"])
            self._totals["help"] += bool(info["called_help"])
            self._totals["correct"] += bool(info["correct"])
        if log_metric is not None:
            for key, value in self.last_metrics.items():
                log_metric(key, value)
        if log_extra is not None:
            log_extra("outcome", [info["outcome"] for info in self.last_infos])
        return list(self.last_rewards)

    def stats(self) -> dict[str, float]:
        """Totals over every completion scored so far: completions, call_rate, help_rate, accuracy, the
        share of each outcome, dropped_tokens; and the env's budget window (calls, episodes)."""
        totals, n = self._totals, max(self._totals["completions"], 1)
        out: dict[str, float] = {
            "completions": totals["completions"],
            "call_rate": totals["calls"] / n,
            "help_rate": totals["help"] / n,
            "accuracy": totals["correct"] / n,
            "dropped_tokens": totals["dropped_tokens"],
        }
        out.update({f"outcome/{name}": totals[f"outcome/{name}"] / n for name in OUTCOMES})
        out.update({"budget/calls": self.env.budget.calls, "budget/episodes": self.env.budget.episodes})
        return out
