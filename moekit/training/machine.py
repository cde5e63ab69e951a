"""What the machine lacks for the run asked of it, said once when training starts: bfloat16
on a CPU without bfloat16 arithmetic, more threads than cores, an OpenMP wait policy that
spins. Warnings, never errors: the run goes on, slower."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from moekit._threads import LIBGOMP_SPIN_COUNT, SPIN_COUNT

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
                     flags: set[str] | None = None, environ=None) -> list[str]:
    """The warnings for a run in ``dtype`` on ``device`` with ``threads`` torch threads
    (default: torch's) on a machine of ``cores`` (default: this one's), in the environment
    ``environ`` (default: this process's)."""
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
    spinning = _spinning_wait_policy(os.environ if environ is None else environ)
    if spinning:
        out.append(f"{spinning}: waiting threads spin instead of sleeping, and beside other busy programs a "
                   "training step can take several times as long; unset it (moekit then lets threads spin "
                   f"{SPIN_COUNT} rounds before they sleep)")
    return out


def _spinning_wait_policy(environ) -> str | None:
    """The user's setting that keeps OpenMP threads spinning far longer than moekit's choice
    (``OMP_WAIT_POLICY=active``, a ``GOMP_SPINCOUNT`` above libgomp's default), else ``None``."""
    if environ.get("OMP_WAIT_POLICY", "").strip().lower() == "active":
        return f"OMP_WAIT_POLICY={environ['OMP_WAIT_POLICY']}"
    spin = environ.get("GOMP_SPINCOUNT", "").strip().lower()
    if spin in ("infinite", "infinity") or (spin.isdigit() and int(spin) > LIBGOMP_SPIN_COUNT):
        return f"GOMP_SPINCOUNT={environ['GOMP_SPINCOUNT']}"
    return None
