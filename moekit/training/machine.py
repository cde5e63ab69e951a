"""What the machine lacks for the run asked of it, said once when training starts: bfloat16
on a CPU without bfloat16 arithmetic, more threads than cores. Warnings, never errors: the
run goes on, slower."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# CPU flags (Linux /proc/cpuinfo) that give bfloat16 matrix products in hardware: x86's
# AVX-512 BF16 and AMX, Arm's BF16 extension
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags, or ``None`` where they cannot be read (not Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in info.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return None


def native_bf16(flags: set[str] | None = None) -> bool | None:
    """Whether this CPU multiplies bfloat16 matrices in hardware; ``None`` where unknown."""
    flags = cpu_flags() if flags is None else flags
    return None if flags is None else any(f in flags for f in BF16_FLAGS)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_warnings(device: torch.device, dtype: str, threads: int | None = None, cores: int | None = None,
                     flags: set[str] | None = None) -> list[str]:
    """The warnings for a run in ``dtype`` on ``device`` with ``threads`` torch threads
    (default: torch's) on a machine of ``cores`` (default: this one's)."""
    out = []
    if device.type != "cpu":
        return out
    if dtype == "bfloat16" and native_bf16(flags) is False:
        out.append(f"train.dtype bfloat16 on a CPU without bfloat16 arithmetic ({platform.machine()}, none of "
                   f"{', '.join(BF16_FLAGS)}): it runs, but its bfloat16 products are emulated and slower than "
                   "float32; train.dtype float32 is the faster choice here")
    threads = torch.get_num_threads() if threads is None else threads
    cores = available_cores() if cores is None else cores
    if threads > cores:
        where = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" if "OMP_NUM_THREADS" in os.environ else \
            "torch.set_num_threads"
        out.append(f"torch runs {threads} threads on {cores} available cores ({where}): threads wait for each "
                   f"other at every parallel step; set OMP_NUM_THREADS={cores} or fewer")
    return out
