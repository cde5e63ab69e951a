"""Memory estimates made before allocating: building a model, training it, a KV cache. A
size that cannot fit is refused with the estimate and what the machine has, before anything
is allocated or written."""

from __future__ import annotations

import os
from pathlib import Path


def available_bytes() -> int | None:
    """Memory the OS can give this process now (``MemAvailable``), ``None`` where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def check_fits(what: str, needed: int, device: str = "cpu") -> None:
    """Raise a MemoryError naming ``what`` when ``needed`` bytes exceed what the device has
    free (the CPU's available memory, or a CUDA device's free memory)."""
    if device.startswith("cuda"):
        import torch

        free = torch.cuda.mem_get_info(torch.device(device))[0] if torch.cuda.is_available() else None
    else:
        free = available_bytes()
    if free is not None and needed > free:
        raise MemoryError(f"{what} needs about {gb(needed)} but {device} has {gb(free)} available; "
                          "choose smaller sizes")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str | int, what: str = "size") -> int:
    """Bytes from ``"4GB"``, ``"1.5 GiB"``, ``"512M"`` (K/M/G/T alone: binary) or a plain
    number of bytes. Raises ValueError naming ``what`` and the units it takes."""
    import re

    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"{what} {text!r} is not a size: write a number with an optional unit, e.g. 4GB, "
                             f"1.5GiB, 512M (units: {', '.join(u for u in _UNITS if u)})")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"{what} must be more than 0 bytes, got {text!r}")
    return value
