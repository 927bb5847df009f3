"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

A checkpoint is a directory `checkpoints/step_000042/` holding
- `policy.safetensors`: the trainable state (all weights, or the LoRA adapters) and the value head,
- `optimizer.safetensors`: every tensor of the optimizer state, flattened by name,
- `state.json`: step, optimizer hyper-parameters, RNG states, the run's config and last metrics.
It is written under a temporary name and renamed when complete, so a run killed while saving
leaves no half-written checkpoint that could be loaded; old checkpoints are renamed out of the
listing before they are deleted, for the same reason. Leftovers of killed runs (hidden `.step_*`
directories) are removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from agents.precision import MasterWeights, trainable_parameters
from collab_env.errors import DeviceCloudError

_STEP_PREFIX = "step_"


class CheckpointError(DeviceCloudError):
    """A checkpoint cannot be used to resume this run."""


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    _, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": _to_json(random.getstate()), "numpy": [keys.tolist(), position, has_gauss, cached]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return state, tensors


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    return value


def _set_rng_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            name = f"{param_id}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for name, value in meta["scalars"].items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def trainable_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, contiguous and unshared (tied weights are stored once)."""
    return {name: param.detach().cpu().contiguous() for name, param in trainable_parameters(module)}


def load_parameters(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `weights` (as saved by `trainable_tensors`) into `module`'s parameters of the same names."""
    params = dict(module.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing:
        raise CheckpointError(
            f"{source} has parameters this model lacks: {missing[:3]}; was it made for another model?"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def save_checkpoint(
    run_dir: Path,
    step: int,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra_state: dict[str, Any],
    keep_last: int,
    master: MasterWeights | None = None,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep_last`.

    With `master`, the weights stored are its fp32 copies, so a resumed run continues from the same
    full-precision state as one that never stopped.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"{_STEP_PREFIX}{step:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    for leftover in root.glob(f".{_STEP_PREFIX}*"):  # half-written or half-deleted by a killed run
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = master.tensors() if master is not None else trainable_tensors(module)
    save_file(weights, str(tmp / "policy.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    rng_json, rng_tensors = _rng_state()
    save_file({**opt_tensors, **rng_tensors}, str(tmp / "optimizer.safetensors"))
    state = {
        "step": step,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_json,
        **extra_state,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        _remove(old)
    return final


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint; renamed out of the listing first, as a kill during rmtree could leave it
    listed (state.json still there) with its weights already gone."""
    doomed = checkpoint.with_name(f".{checkpoint.name}.del-{os.getpid()}")
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(_STEP_PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(_STEP_PREFIX) :]))


def load_checkpoint(
    path: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    master: MasterWeights | None = None,
) -> dict[str, Any]:
    """Restore weights (and optimizer, scheduler, RNG states, master weights when given); returns state.json."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "policy.safetensors"))
        tensors = load_file(str(path / "optimizer.safetensors")) if optimizer is not None else {}
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({err}); delete it to resume from an earlier one."
        ) from err
    load_parameters(module, weights, path)
    if master is not None:
        master.load(weights)
    if optimizer is not None:
        rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
        _load_optimizer(
            optimizer, {k: v for k, v in tensors.items() if not k.startswith("rng.")}, state["optimizer"]
        )
        _set_rng_state(state["rng"], rng)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state
