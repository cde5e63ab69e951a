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
