"""Files written so that a crash at any moment leaves the old version or the new one, never
half of either: the one place that knows how (checkpoints, run files, tokenizers, exported
models all call it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_umask_lock = threading.Lock()


def process_umask() -> int:
    """The process's umask, read without changing it where the OS says it (Linux's
    ``/proc/self/status``); elsewhere set and restored at once, under a lock."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def fsync_files(directory: Path) -> None:
    """Flush every file directly inside ``directory`` to disk."""
    for f in Path(directory).iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes files private; give them the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``final`` to write into; on leaving the block without an
    error its files are flushed and it takes ``final``'s place (an existing ``final`` is
    swapped out, then removed: write new, then swap, never delete first). On an error it is
    removed and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        fsync_files(tmp)
        os.chmod(tmp, 0o777 & ~process_umask())
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_unsafe_target(target: str | Path, sources: tuple[str | Path, ...] = (), what: str = "replace") -> Path:
    """``target`` resolved, or a ValueError when removing or replacing it could lose data
    that is not its own: it is (or contains, or lies inside) one of ``sources``, or it is the
    current directory, one of its parents, the home folder or the root. Checked before any
    write."""
    target = Path(target).resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == cwd or target in cwd.parents:
        raise ValueError(f"refusing to {what} {target}: it is the current directory or one of its parents")
    if target == home or target == Path(target.anchor):
        raise ValueError(f"refusing to {what} {target}: it is the home folder or the root")
    for src in sources:
        src = Path(src).resolve()
        if target == src:
            raise ValueError(f"refusing to {what} {target}: it is the source")
        if target in src.parents:
            raise ValueError(f"refusing to {what} {target}: it contains the source {src}")
        if src in target.parents:
            raise ValueError(f"refusing to {what} {target}: it lies inside the source {src}")
    return target
