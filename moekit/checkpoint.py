"""The run directory: written atomically, read without unpickling.

The format that training writes and that interop, analysis, inference and the CLI read, so
it lives below all of them (not in ``training/``, which would make every reader depend on
the training loop). A run directory holds ``config.json``, the tokenizer file for BPE, and
checkpoints in ``step_NNNNNNN/`` (``model.safetensors`` + ``state.pt``: optimizer, step, RNG). A checkpoint
is written into a temporary folder that is renamed into place, and only then does the
``latest`` file (itself replaced atomically) point at it, so a kill at any moment leaves the
previous checkpoint intact and ``latest`` naming a complete one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.config import RunConfig
from moekit.io import atomic_write_bytes, staged_dir

CONFIG_FILE = "config.json"
LATEST_FILE = "latest"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"


def save_config(run_dir: Path, config: RunConfig) -> None:
    atomic_write_bytes(Path(run_dir) / CONFIG_FILE, (json.dumps(config.to_dict(), indent=2) + "\n").encode())


def load_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a moekit run directory")
    try:
        data = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the run directory is damaged") from None
    return RunConfig.from_dict(data)


def state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, contiguous, with tied weights stored once (safetensors refuses
    shared storage)."""
    return _dedup(model.state_dict())


def _dedup(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for name, t in weights.items():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous()
    return out


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, state: dict[str, Any], keep: int = 2,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``step`` of ``model`` (or of the given full ``weights``, e.g. gathered
    from expert-parallel processes) and the training ``state``; keep the newest ``keep``."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    final = run_dir / f"step_{step:07d}"  # an existing one (a run resumed from an earlier step) is swapped out
    with staged_dir(final) as tmp:
        tensors = state_dict_for_save(model) if weights is None else _dedup(weights)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"step": str(step)})
        torch.save(state, tmp / STATE_FILE)
    atomic_write_bytes(run_dir / LATEST_FILE, f"{final.name}\n".encode())
    for old in sorted(run_dir.glob("step_*"))[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder of a run directory (via ``latest``), or ``path`` itself when it
    is a checkpoint folder."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return path
    pointer = path / LATEST_FILE
    if not pointer.is_file():
        raise FileNotFoundError(f"no checkpoint in {path}: neither {WEIGHTS_FILE} nor a '{LATEST_FILE}' file")
    ckpt = path / pointer.read_text().strip()
    if not (ckpt / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {ckpt.name} but {ckpt / WEIGHTS_FILE} is missing")
    return ckpt


def load_weights(model: nn.Module, ckpt: Path) -> None:
    """Load ``ckpt/model.safetensors`` into ``model``; a ValueError names every missing,
    unexpected or mis-shaped tensor, and a damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(ckpt) / WEIGHTS_FILE
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); the checkpoint is damaged") from None
    expected = state_dict_for_save(model)
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    for name in sorted(set(expected) & set(tensors)):
        if expected[name].shape != tensors[name].shape:
            problems.append(f"{name}: checkpoint {tuple(tensors[name].shape)} vs model {tuple(expected[name].shape)}")
    if problems:
        raise ValueError(f"{path} does not match the model: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=False)  # tied weights appear once in the file


def load_state(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: never unpickle it unsafely
        raise ValueError(f"{path} cannot be read as a moekit training state ({exc})") from None


def load_trained(path: str | Path, device: str | torch.device = "cpu"):
    """A trained model ready for inference, from a run directory or one of its ``step_*``
    folders. Returns ``(model, tokenizer, config)``."""
    from moekit.data import load_tokenizer
    from moekit.models import Transformer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    where = latest_checkpoint(path)
    run_dir = path if (path / CONFIG_FILE).is_file() else where.parent  # a run dir, or one of its step_* folders
    config = load_config(run_dir)
    model = Transformer(config.model)
    load_weights(model, where)
    model.to(device).eval()
    return model, load_tokenizer(config.data.tokenizer, run_dir), config
