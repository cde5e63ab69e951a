"""Building, caching and loading the C kernels, and the switch that turns them off.

The C files are compiled with the system's C compiler (``$CC``, else ``cc`` or ``gcc``;
``-O3 -march=native -fopenmp``) into a cache folder (``$MOEKIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/moekit``, else ``~/.cache/moekit``), under a name that hashes the
sources, the flags, the CPU and the torch version, and written atomically. Where there is
no compiler, the build fails, or ``MOEKIT_KERNELS=0`` is set, :func:`load` returns ``None``
and callers use torch ops; :func:`status` says which and why. OpenMP comes from the
``libgomp.so.1`` torch has already loaded, so the kernels share torch's threads.

:class:`enabled` is the public switch: ``with moekit.kernels.enabled(False): ...`` runs
every module on its torch-ops path (tests use it to compare the two), and
``moekit.kernels.enabled(False)`` alone turns the kernels off for the process.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from moekit.kernels.ffi import declare

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_gemv.c", "cpu_rows.c", "cpu_lowp.c", "cpu_blocks.c",
                                                          "cpu_blocks_bf16.c")]
# included by the sources: hashed with them
HEADERS = [Path(__file__).with_name(name) for name in ("cpu_bf16.h", "cpu_vmath.h", "cpu_tiles.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_built: dict = {}  # "lib": CDLL or None, "reason": str
_switch = {"on": True}


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if os.environ.get("MOEKIT_CACHE_DIR"):
        return Path(os.environ["MOEKIT_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moekit" / "kernels"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(lines))  # the first of each kind is enough


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: a concurrent build finds a whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> ctypes.CDLL | None:
    """The compiled kernels, building them the first time; ``None`` where unavailable.
    Ignores :class:`enabled` (tests of the kernels themselves call them directly)."""
    with _lock:
        if "reason" in _built:
            return _built["lib"]
        lib, reason = None, ""
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if os.environ.get("MOEKIT_KERNELS", "1") == "0":
            reason = "disabled by MOEKIT_KERNELS=0"
        elif platform.system() != "Linux":
            reason = f"built on Linux only, this is {platform.system()}"
        elif compiler is None:
            reason = "no C compiler found (set CC, or install gcc)"
        else:
            key = hashlib.sha256("\n".join([*(src.read_text() for src in SOURCES + HEADERS), compiler, *FLAGS, _cpu_id(),
                                            torch.__version__]).encode()).hexdigest()[:16]
            target = cache_dir() / f"moekit-cpu-{key}.so"
            try:
                if not target.exists():
                    _build(compiler, target)
                try:
                    lib = declare(ctypes.CDLL(str(target)))
                except OSError:  # a damaged file in the cache: build it again, once
                    _build(compiler, target)
                    lib = declare(ctypes.CDLL(str(target)))
                reason = f"compiled ({target})"
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                lib, reason = None, f"build failed, using torch ops: {exc}"
        # asked once: the layer's path choice reads it on every call
        _built.update(lib=lib, reason=reason, rows_simd=lib is not None and bool(lib.moekit_rows_simd()),
                      blocks_bf16=lib is not None and bool(lib.moekit_blocks_bf16_built()))
        return lib


def status() -> str:
    """One line: whether the kernels are in use, and why not."""
    load()
    if _built["lib"] is not None and not _switch["on"]:
        return "cpu kernels off: disabled by moekit.kernels.enabled(False)"
    if _built["lib"] is None:
        return "cpu kernels off: " + _built["reason"]
    simd = {3: "AVX-512 VNNI, bf16 by AVX-512 BF16", 2: "AVX-512 VNNI", 1: "AVX2"}.get(
        _built["lib"].moekit_lowp_simd(), "plain C loops (no AVX2 on this CPU or build)")
    rows = "AVX-512" if few_rows_vectorised() else "plain C loops (no AVX-512: experts take the blocked kernel)"
    bf16 = "AVX-512 BF16" if blocks_bf16() else "oneDNN (no AVX-512 BF16 in this build)"
    return (f"cpu kernels: {_built['reason']}; few-row products: {rows}; int8/int4 products: {simd}; "
            f"bfloat16 experts: {bf16}")


def few_rows_vectorised() -> bool:
    """Whether the built kernels' few-row products (the experts' row kernel) are the AVX-512
    loops; without them the experts take the blocked kernel at every row count."""
    load()
    return _built["rows_simd"]


def blocks_bf16() -> bool:
    """Whether the built kernels have the bfloat16 blocked experts (``cpu_blocks_bf16.c``,
    which needs AVX-512 BF16); without them bfloat16 experts run as torch's products."""
    load()
    return _built["blocks_bf16"]


class enabled:
    """Turn moekit's CPU kernels on or off for the whole process, as a call or a context
    manager (like ``torch.set_grad_enabled``)::

        moekit.kernels.enabled(False)          # off from here on
        with moekit.kernels.enabled(False):    # off inside, restored after
            ...

    Off, every module takes its torch-ops path (the same results to float32 rounding).
    ``MOEKIT_KERNELS=0`` in the environment keeps them off whatever this says.
    """

    def __init__(self, on: bool):
        if not isinstance(on, bool):
            raise ValueError(f"moekit.kernels.enabled takes True or False, got {on!r}")
        self.previous = _switch["on"]
        _switch["on"] = on

    def __enter__(self) -> enabled:
        return self

    def __exit__(self, *exc) -> None:
        _switch["on"] = self.previous


def is_enabled() -> bool:
    """Whether :class:`enabled` has the kernels on (they may still be unavailable: :func:`load`)."""
    return _switch["on"]


def for_tensors(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> ctypes.CDLL | None:
    """The kernels where the modules should use them on ``tensors``, else ``None``: switched
    on, built, every tensor on the CPU in one of ``dtypes`` (float32 unless the kernel takes
    more), and outside ``torch.compile`` (which cannot trace a foreign call)."""
    if not _switch["on"] or not all(t.dtype in dtypes and t.device.type == "cpu" for t in tensors):
        return None
    if torch.compiler.is_compiling():
        return None
    return load()
