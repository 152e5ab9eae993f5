"""Atomic training checkpoints that resume exactly, stored without pickle.

A checkpoint is a directory ``checkpoint-<step>/`` holding

* ``trainable.safetensors``  every parameter with ``requires_grad`` (by name);
* ``optimizer.safetensors``  optimizer tensors, keys ``state.<param index>.<name>``;
* ``rng.safetensors``        torch CPU (and CUDA) generator states;
* ``trainer_state.json``     step, sampler position, optimizer scalars and
  param groups, Python and NumPy RNG states, the run config, written last.

It is written to a temporary sibling directory, flushed, then renamed into
place, so a crash leaves either the previous checkpoint or the new one, never a
half-written directory that looks complete. Loading reads only safetensors and
JSON: a checkpoint from somewhere else cannot run code (``torch.load`` would
unpickle).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "read_trainer_state", "check_parameters",
           "rng_state", "set_rng_state"]

_STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> tuple[dict, dict]:
    """(JSON-able Python/NumPy states, tensors of the torch generators)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    json_part = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return json_part, tensors


def set_rng_state(json_part: dict, tensors: dict) -> None:
    version, mt, gauss = json_part["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = sorted(k for k in tensors if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def _split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _join_optimizer_state(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int | None = None) -> str:
    """Write ``output_dir/checkpoint-<step>`` atomically; keep the newest ``keep`` (None: all)."""
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=output_dir)
    try:
        opt_tensors, opt_meta = _split_optimizer_state(optimizer)
        rng_json, rng_tensors = rng_state()
        save_file(trainable_state(model), os.path.join(tmp, "trainable.safetensors"))
        save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
        payload = dict(state, step=step, optimizer=opt_meta, rng=rng_json)
        with open(os.path.join(tmp, _STATE_FILE), "w") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # re-saving a step (after a resume): swap, then drop the old one
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for path in _checkpoints(output_dir)[:-keep]:
            shutil.rmtree(path)
    return final


def _checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(output_dir, name, _STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def list_checkpoints(output_dir: str) -> list[str]:
    """Paths of the complete checkpoints in ``output_dir``, lowest step first."""
    return _checkpoints(output_dir)


def checkpoint_step(path: str) -> int:
    """The step of checkpoint ``path`` (from its directory name ``checkpoint-<step>``)."""
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    if m is None:
        raise ValueError(f"{path} is not named checkpoint-<step>")
    return int(m.group(1))


def latest_checkpoint(output_dir: str) -> str | None:
    """Path of the newest complete checkpoint in ``output_dir``, or None."""
    found = _checkpoints(output_dir)
    return found[-1] if found else None


def read_trainer_state(path: str) -> dict:
    """The JSON trainer state of checkpoint ``path`` (step, config, dataset sizes, ...), without loading tensors."""
    state_path = os.path.join(path, _STATE_FILE)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {_STATE_FILE})")
    with open(state_path) as f:
        return json.load(f)


def check_parameters(path: str, shapes: dict[str, tuple]) -> None:
    """Refuse checkpoint ``path`` unless it holds exactly the trainable parameters ``{name: shape}``.

    Reads only the safetensors header, so a run learns of a different adapter
    (other rank, targets or method) before any weight is loaded.
    """
    with safe_open(os.path.join(path, "trainable.safetensors"), framework="pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    missing, unexpected = sorted(set(shapes) - set(saved)), sorted(set(saved) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model's trainable parameters: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in shapes.items():
        if saved[name] != tuple(shape):
            raise ValueError(f"checkpoint {path}: {name} has shape {saved[name]}, model has {tuple(shape)}")


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore trainable parameters, optimizer and RNG states; return the JSON trainer state.

    The model must already have the same trainable parameters (same LoRA
    targets and rank); a mismatch is an error naming the differing parameters.
    """
    state = read_trainer_state(path)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_parameters(path, {n: p.shape for n, p in params.items()})
    saved = load_file(os.path.join(path, "trainable.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    if optimizer is not None:
        opt = _join_optimizer_state(load_file(os.path.join(path, "optimizer.safetensors")), state["optimizer"])
        optimizer.load_state_dict(opt)
    set_rng_state(state["rng"], load_file(os.path.join(path, "rng.safetensors")))
    return state
