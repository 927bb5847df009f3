"""A verl custom reward function for the parquet files of `python -m collab_env.export`.

    custom_reward_function.path=<site-packages>/collab_env/integrations/verl.py
    custom_reward_function.name=compute_score
    +custom_reward_function.reward_kwargs.cloud.name=simulated   # optional: any DeviceCloud-v0 argument

verl calls `compute_score(data_source, solution_str, ground_truth, extra_info)` once per response, with
the decoded response text and the row's `reward_model.ground_truth` and `extra_info`. The row names its
prompt (`extra_info.prompt_id`) and the env settings it was exported with (`extra_info.env`, JSON); the
env is built once per settings and process and scores the response with `score()`, the code that ends
`DeviceCloud-v0`'s `step`: marker detection, verifier, cloud oracle and cache, budget window. verl
passes `reward_kwargs` as keyword arguments, which override the exported settings (e.g. another cloud).

verl decodes responses with `skip_special_tokens=True`, so the text is re-tokenized with the env's
tokenizer: the marker is found on the text as on tokens, an EOS that was dropped changes only the
episode's `stop_reason`, not its reward. Each verl reward worker process has its own env, hence its
own budget window. Nothing here imports verl.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from collab_env.env import DeviceCloudEnv
from collab_env.errors import DatasetError

_ENVS: dict[str, DeviceCloudEnv] = {}


def env_for(extra_info: Mapping[str, Any], **env_kwargs: Any) -> DeviceCloudEnv:
    """The env that scores a row: built from `extra_info["env"]` updated by `env_kwargs`, once per process."""
    if "env" not in extra_info or "prompt_id" not in extra_info:
        raise DatasetError(
            "extra_info needs 'prompt_id' and 'env' (the env settings as JSON): write the parquet files "
            "with python -m collab_env.export."
        )
    settings = {**json.loads(extra_info["env"]), **env_kwargs}
    key = json.dumps(settings, sort_keys=True, default=str)
    if key not in _ENVS:
        _ENVS[key] = DeviceCloudEnv(**settings)
    return _ENVS[key]


def score_response(
    solution_str: str, ground_truth: str, extra_info: Mapping[str, Any], **env_kwargs: Any
) -> tuple[float, dict[str, Any]]:
    """Reward and the env's info for one response text (what `compute_score` returns the reward of)."""
    env = env_for(extra_info, **env_kwargs)
    prompt_id = int(extra_info["prompt_id"])
    problem = env.task.problem(prompt_id)
    if str(ground_truth) != problem.answer:
        raise DatasetError(
            f"row of prompt {prompt_id}: ground truth {ground_truth!r} is not the task's answer "
            f"{problem.answer!r}; the parquet was written from other task settings or another version. "
            "Export it again."
        )
    return env.score(prompt_id, env.tokenizer.encode(solution_str, add_special_tokens=False))


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: Mapping[str, Any] | None = None,
    **env_kwargs: Any,
) -> float:
    """verl's reward function: the env's reward for a response (the hierarchical reward, v3 eq. 18)."""
    del data_source  # every row names its task in extra_info["env"]
    return score_response(solution_str, ground_truth, extra_info or {}, **env_kwargs)[0]
