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
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.config import RunConfig
from moekit.io import atomic_write_bytes, staged_dir

CONFIG_FILE = "config.json"
MARKER_FILE = ".moekit"  # in every folder moekit writes: a run, or an export (what may be replaced)
LOCK_FILE = ".lock"  # the one process writing a run
LATEST_FILE = "latest"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"


def marker_bytes(kind: str) -> bytes:
    """The content of :data:`MARKER_FILE` for a folder of ``kind`` (``"run"`` or ``"export"``)."""
    return (json.dumps({"written_by": "moekit", "kind": kind}) + "\n").encode()


def written_by_moekit(folder: str | Path) -> bool:
    """Whether ``folder`` is one moekit wrote: it holds the marker, or (runs from before the
    marker) a ``config.json`` with a ``latest`` pointer or ``step_*`` checkpoints beside it."""
    folder = Path(folder)
    if (folder / MARKER_FILE).is_file():
        return True
    return (folder / CONFIG_FILE).is_file() and ((folder / LATEST_FILE).is_file() or any(folder.glob("step_*")))


def check_destination(folder: str | Path, sources: tuple[str | Path, ...] = (), overwrite: bool = True) -> Path:
    """Refuse, before anything is read or written, a destination folder whose replacement
    could lose someone's data: a file, the source or a folder around or inside it, the current
    directory or a parent (see :func:`moekit.io.refuse_unsafe_target`), a non-empty folder
    without ``overwrite``, or one moekit did not write. Returns ``folder`` as a Path."""
    from moekit.io import refuse_unsafe_target

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is a file, not a folder; choose another destination")
    refuse_unsafe_target(folder, sources, what="replace")
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        if not written_by_moekit(folder):
            raise ValueError(f"refusing to replace {folder}: it is not a folder moekit wrote (no {MARKER_FILE} marker)")
    return folder


def save_config(run_dir: Path, config: RunConfig) -> None:
    atomic_write_bytes(Path(run_dir) / MARKER_FILE, marker_bytes("run"))
    atomic_write_bytes(Path(run_dir) / CONFIG_FILE, (json.dumps(config.to_dict(), indent=2) + "\n").encode())


def holds_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` already holds a run's checkpoints."""
    run_dir = Path(run_dir)
    return (run_dir / LATEST_FILE).exists() or any(run_dir.glob("step_*"))


def clear_run(run_dir: str | Path) -> None:
    """Remove a previous run's outputs from ``run_dir`` (checkpoints, ``latest``, metrics,
    summary, leftovers of killed writes) so a new run starts clean; only in a folder moekit
    wrote (see :func:`written_by_moekit`), never the current directory or a parent of it."""
    from moekit.io import refuse_unsafe_target

    run_dir = Path(run_dir)
    refuse_unsafe_target(run_dir, what="overwrite the run in")
    if not written_by_moekit(run_dir):
        raise ValueError(f"refusing to overwrite {run_dir}: it is not a folder moekit wrote (no {MARKER_FILE} marker)")
    for old in run_dir.glob("step_*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    for name in (LATEST_FILE, "metrics.jsonl", "summary.json"):
        (run_dir / name).unlink(missing_ok=True)
    clean_leftovers(run_dir)


def clean_leftovers(run_dir: str | Path) -> list[str]:
    """Remove the temporary folders and files a killed write left in ``run_dir``; returns
    their names."""
    removed = []
    for tmp in Path(run_dir).glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    for old in Path(run_dir).glob(".*.old"):
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old.name)
    return removed


class RunLock:
    """One writer per run directory: ``.lock`` holds the writer's pid and host. A second
    writer is refused with the holder named; a lock whose process is gone (same host, pid
    not running) is stale and taken over."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> RunLock:
        import os
        import socket

        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder(settle_s=0.5)
                if holder is not None and holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                who = (f"process {holder.get('pid')} on {holder.get('host')}" if holder else "an unknown writer")
                raise ValueError(f"{self.path.parent} is in use by {who} ({self.path}); wait for it to finish, or "
                                 "remove the lock file if that process is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise ValueError(f"could not take {self.path}: another process keeps taking it")

    def _holder(self, settle_s: float = 0.0) -> dict | None:
        """The lock's pid and host; ``None`` where it is unreadable. A writer creates the file
        and then writes it: an empty or partial lock is read again for up to ``settle_s``
        seconds, so that a writer caught in between is named, not called unknown."""
        deadline = time.monotonic() + settle_s
        while True:
            try:
                data = json.loads(self.path.read_text("utf-8"))
                return data if isinstance(data, dict) else None
            except (OSError, ValueError):
                if time.monotonic() >= deadline or not self.path.exists():
                    return None
                time.sleep(0.01)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid) -> bool:
    import os

    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


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
    name = pointer.read_text("utf-8", errors="replace").strip()
    if not re.fullmatch(r"step_\d{7}", name):  # a path read from a file never leaves its folder
        raise ValueError(f"{pointer} must name a step_NNNNNNN folder of {path}, got {name[:80]!r}")
    ckpt = path / name
    if not (ckpt / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {ckpt.name} but {ckpt / WEIGHTS_FILE} is missing")
    return ckpt


def load_weights(model: nn.Module, ckpt: Path) -> None:
    """Load ``ckpt/model.safetensors`` into ``model``; a ValueError names every missing,
    unexpected or mis-shaped tensor, and a damaged file."""
    expected = {k: tuple(t.shape) for k, t in state_dict_for_save(model).items()}
    model.load_state_dict(read_weights(Path(ckpt) / WEIGHTS_FILE, expected), strict=False)  # tied weights appear once


def read_weights(path: Path, expected: dict[str, tuple[int, ...]], leave=lambda name: False,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``expected`` names (name -> shape) from the safetensors file ``path``, each
    checked; tensors for which ``leave(name)`` holds stay unread (offloaded experts) and
    ``dtype`` converts floating ones. A ValueError names every missing, unexpected or
    mis-shaped tensor, and a damaged file."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        keys = set(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); the checkpoint is damaged") from None
    missing = sorted(set(expected) - keys)
    unexpected = sorted(k for k in keys - set(expected) if not leave(k))
    problems = [f"missing {missing}"] if missing else []
    problems += [f"unexpected {unexpected}"] if unexpected else []
    state = {}
    for name in sorted(keys & set(expected)):
        try:
            t = handle.get_tensor(name)
        except Exception as exc:  # a truncated file fails here, after a valid header
            raise ValueError(f"cannot read tensor {name} from {path} ({exc}); the checkpoint is damaged") from None
        if tuple(t.shape) != tuple(expected[name]):
            problems.append(f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(expected[name])}")
        state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if problems:
        raise ValueError(f"{path} does not match the model: " + "; ".join(problems))
    return state


def load_state(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: never unpickle it unsafely
        raise ValueError(f"{path} cannot be read as a moekit training state ({exc})") from None


def run_dir_of(path: str | Path) -> tuple[Path, Path]:
    """``(run directory, checkpoint folder)`` of a run directory or one of its ``step_*``
    folders (the checkpoint: the latest one of a run directory)."""
    path = Path(path)
    where = latest_checkpoint(path)
    return (path if (path / CONFIG_FILE).is_file() else where.parent), where


def load_trained(path: str | Path, device: str | torch.device = "cpu"):
    """A trained model ready for inference, from a run directory or one of its ``step_*``
    folders (a LoRA run's adapters merged into the weights). Returns ``(model, tokenizer,
    config)``."""
    from moekit.data import load_tokenizer
    from moekit.models import Transformer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    run_dir, where = run_dir_of(path)
    config = load_config(run_dir)
    model = Transformer(config.model)
    if config.lora.rank:  # a LoRA run: its checkpoints hold the adapters, merged for use
        from moekit.models.lora import attach_lora, merge_lora

        attach_lora(model, config.lora)
        load_weights(model, where)
        merge_lora(model)
    else:
        load_weights(model, where)
    model.to(device).eval()
    return model, load_tokenizer(config.data.tokenizer, run_dir), config


def write_run(dst: Path, config: RunConfig, model: nn.Module, tokenizer: Any, info: dict[str, Any]) -> None:
    """A moekit run directory holding ``model`` as its step-0 checkpoint (what ``moekit
    convert``, ``upcycle`` and ``compose`` write; ``moekit train --init`` starts from it).
    Written beside ``dst`` and swapped in whole: never delete-then-write. ``info`` goes into
    the checkpoint's state (where the weights came from). Check ``dst`` first with
    :func:`check_destination`."""
    with staged_dir(dst) as tmp:
        save_config(tmp, config)
        if tokenizer is not None:
            tokenizer.save(tmp)
        save_checkpoint(tmp, 0, model, {"step": 0, **info})
        (tmp / MARKER_FILE).write_bytes(marker_bytes("run"))
