"""LoRA adapters on their own: save them (safetensors, their config in the metadata) and load
them onto a base model. Attaching, merging and removing them is :mod:`moekit.models.lora`
(re-exported here)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from moekit.config import LoRAConfig
from moekit.models.lora import adapter_state, attach_lora, has_adapters, merge_lora, remove_adapters

ADAPTER_FILE = "adapters.safetensors"
_CONFIG_KEY = "moekit_lora"

__all__ = ["ADAPTER_FILE", "adapter_state", "attach_lora", "has_adapters", "load_adapters", "merge_lora",
           "remove_adapters", "save_adapters"]


def save_adapters(model: nn.Module, path: str | Path, config: LoRAConfig) -> Path:
    """Write the adapters alone to ``path`` (a ``.safetensors`` file, or a folder that gets
    :data:`ADAPTER_FILE`), atomically, with ``config`` in the file's metadata."""
    from safetensors.torch import save as save_bytes

    from moekit.io import atomic_write_bytes

    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / ADAPTER_FILE
    state = adapter_state(model)
    if not state:
        raise ValueError("the model has no adapters to save")
    meta = {_CONFIG_KEY: json.dumps({"rank": config.rank, "alpha": config.alpha, "dropout": config.dropout,
                                     "targets": config.targets})}
    atomic_write_bytes(path, save_bytes(state, metadata=meta))
    return path


def load_adapters(model: nn.Module, path: str | Path) -> LoRAConfig:
    """Attach the adapters saved by :func:`save_adapters` to the base ``model`` and load
    their values. A file whose adapters do not fit the model is a ValueError naming them."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    if _CONFIG_KEY not in meta:
        raise ValueError(f"{path} holds no moekit LoRA metadata: it was not written by save_adapters")
    try:
        config = LoRAConfig(**json.loads(meta[_CONFIG_KEY]))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: its LoRA metadata is invalid ({exc})") from None
    attach_lora(model, config)
    expected = adapter_state(model)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or extra or wrong:
        remove_adapters(model)
        raise ValueError(f"{path} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"mis-shaped {wrong[:3]}")
    model.load_state_dict(state, strict=False)
    return config
