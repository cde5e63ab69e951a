"""Reading parts of a safetensors file by byte range: one expert's slice of a 3-D tensor
without touching the rest (expert offloading reads experts on demand this way).

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the data. :func:`tensor_locations` reads and
checks the header (every range inside the file and the size its dtype and shape imply);
:func:`read_tensor` reads one tensor, or one index of its first dimension, with ``os.preadv``
(which releases the GIL, so a background thread can read while the model computes).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie: ``file``, ``start`` (absolute offset), ``dtype``, ``shape``."""

    file: Path
    start: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def tensor_locations(path: str | Path) -> dict[str, TensorLocation]:
    """Every tensor of the safetensors file ``path`` by name, from its header. Raises
    ValueError naming the file for a header that is not one, an unknown dtype or a range
    that does not match its shape or lies outside the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} has a damaged safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a damaged safetensors header (not a JSON object)")
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a damaged header entry {info!r} (dtypes read: "
                             f"{sorted(_DTYPES)})") from None
        loc = TensorLocation(path, base + begin, dtype, shape)
        if min(shape, default=0) < 0 or begin < 0 or end - begin != loc.nbytes or base + end > size:
            raise ValueError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) claims bytes {begin}..{end} "
                             f"of a {size - base}-byte data section; the file is damaged")
        out[name] = loc
    return out


def read_tensor(fd: int, loc: TensorLocation, index: int | None = None,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor at ``loc`` read from the open file ``fd`` (``loc.file``); with ``index``
    only ``tensor[index]``, and with ``rows = (a, b)`` only rows ``a:b`` of that (the bytes
    of that one slice, which is contiguous). A new tensor in the file's dtype."""
    shape, offset, size = loc.shape, loc.start, loc.dtype.itemsize
    if index is not None:
        if not 0 <= index < shape[0]:
            raise IndexError(f"index {index} is outside the first dimension ({shape[0]}) of {loc.file}")
        shape = shape[1:]
        offset += index * math.prod(shape) * size
    if rows is not None:
        a, b = rows
        if not 0 <= a <= b <= shape[0]:
            raise IndexError(f"rows {a}:{b} are outside the first dimension ({shape[0]}) of {loc.file}")
        offset += a * math.prod(shape[1:]) * size
        shape = (b - a, *shape[1:])
    nbytes = math.prod(shape) * size
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view, got = memoryview(buf.numpy()), 0
    while got < nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise ValueError(f"{loc.file} ended while reading {nbytes} bytes at offset {offset}; the file is damaged")
        got += n
    return buf.view(loc.dtype).view(shape)
