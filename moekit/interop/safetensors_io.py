"""Reading and writing safetensors checkpoints: one file or shards with an index, read
lazily (a tensor is read when asked for) and never through pickle.

:class:`SafetensorsDir` is a read-only mapping ``name -> tensor`` over a directory;
:func:`save_safetensors_dir` writes a state dict as shards plus
``model.safetensors.index.json`` (the Hugging Face layout) into a directory atomically.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from moekit.io import staged_dir

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsDir(Mapping):
    """The tensors of every safetensors file of a directory, read on access.

    Raises ValueError naming the file for a damaged header or a missing shard, and
    FileNotFoundError when the directory holds no safetensors at all (a ``.bin`` pickle
    is refused with the reason: moekit never unpickles a file it is handed).
    """

    def __init__(self, directory: str | Path):
        from safetensors import SafetensorError, safe_open

        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        weight_map = _read_index(index) if index.is_file() else None
        present = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if weight_map is not None:
            files = sorted(set(weight_map.values()))
            stray = sorted(set(present) - set(files))
            if stray:  # never merged: the index says what the model is
                warnings.warn(f"{self.directory}: {stray} not named by {INDEX_FILE}; not read", stacklevel=2)
        elif len(present) > 1:
            raise ValueError(f"{self.directory} holds {len(present)} .safetensors files {present[:6]} and no "
                             f"{INDEX_FILE} saying which tensors each holds; add the index or remove the extra files")
        else:
            files = present
        if not files:
            pickles = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt"))
            hint = (f"; found {pickles}: moekit does not unpickle checkpoints, convert them to safetensors first"
                    if pickles else "")
            raise FileNotFoundError(f"no .safetensors weights in {self.directory}{hint}")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise ValueError(f"{index} lists the shard {name}, which is missing from {self.directory}")
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
            self._handles[name] = handle
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                if key in self._where:
                    raise ValueError(f"tensor {key} is in both {self._where[key]} and {name} in {self.directory}")
                self._where[key] = name
        if weight_map is not None:
            absent = sorted(k for k, f in weight_map.items() if self._where.get(k) != f)
            if absent:
                raise ValueError(f"{index} lists {len(absent)} tensor(s) its shards lack, e.g. {absent[:3]}")
            unnamed = sorted(set(self._where) - set(weight_map))
            if unnamed:
                raise ValueError(f"the shards in {self.directory} hold {len(unnamed)} tensor(s) {INDEX_FILE} does not "
                                 f"name, e.g. {unnamed[:3]}")

    def __getitem__(self, key: str) -> torch.Tensor:
        name = self._where[key]
        try:
            return self._handles[name].get_tensor(key)
        except Exception as exc:  # a truncated file fails here, after a valid header
            raise ValueError(f"cannot read tensor {key} from {self.directory / name} ({exc}); the file is damaged") from None

    def file_of(self, key: str) -> Path:
        """The file holding tensor ``key``."""
        return self.directory / self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _read_index(index: Path) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> shard file), checked: JSON of the right
    shape, every shard a plain ``.safetensors`` file name inside the index's own folder."""
    try:
        data = json.loads(index.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{index} is not valid JSON ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ValueError(f"{index} is not a safetensors index: it needs a \"weight_map\" object mapping tensor "
                         "names to shard file names")
    for shard in sorted(set(weight_map.values())):
        if (Path(shard).name != shard or shard in (".", "..") or "\\" in shard
                or not shard.endswith(".safetensors")):
            raise ValueError(f"{index} names the shard {shard!r}; a shard must be a .safetensors file in the "
                             f"index's own folder (a plain file name, no path)")
    return weight_map


def save_safetensors_dir(
    tensors: dict[str, torch.Tensor],
    directory: str | Path,
    extra_files: dict[str, bytes] | None = None,
    max_shard_bytes: int = 4 << 30,
) -> None:
    """Write ``tensors`` (and ``extra_files``: name -> bytes) into ``directory``.

    One ``model.safetensors`` when it fits in ``max_shard_bytes``, else
    ``model-0000i-of-0000n.safetensors`` shards and an index. Everything is written into a
    temporary folder beside ``directory`` that then replaces it, so a crash never leaves a
    half-written model; an existing ``directory`` is replaced.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    with staged_dir(directory) as tmp:
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
                total += sum(t.numel() * t.element_size() for t in shard.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
