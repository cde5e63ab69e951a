"""Text corpora: the running Python's standard library sources by default, or any text
file or folder of text files; and calibration text cut into windows of token ids."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

SEPARATOR = "\n\n"


def stdlib_files() -> list[Path]:
    """The ``.py`` files of this interpreter's standard library (about 30 MB), in a fixed
    order; third-party packages are left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts) and p.is_file())


def text_files(path: Path, suffixes: str) -> list[Path]:
    if path.is_file():
        return [path]
    wanted = {s.strip().lower() for s in suffixes.split(",") if s.strip()}
    files = sorted(p for p in path.rglob("*") if p.is_file() and (not wanted or p.suffix.lower() in wanted))
    if not files:
        raise ValueError(f"no text files with suffixes {sorted(wanted)} under {path} (set data.suffixes)")
    return files


def load_text(path: str | None = None, suffixes: str = ".txt,.md,.py,.rst", max_chars: int | None = None) -> str:
    """The corpus as one string, files joined by a blank line.

    ``path=None`` reads the standard library; files there that are deliberately not UTF-8
    (a few encoding tests) are skipped. A user's file that is not UTF-8 is an error naming it.
    """
    if path is None:
        files, strict = stdlib_files(), False
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"data path {p} does not exist (give a text file or a folder of text files)")
        files, strict = text_files(p, suffixes), True
    parts, size = [], 0
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            if strict:
                raise ValueError(
                    f"{f} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it or leave it out"
                ) from None
            continue
        parts.append(text)
        size += len(text) + len(SEPARATOR)
        if max_chars is not None and size >= max_chars:
            break
    text = SEPARATOR.join(parts)
    if max_chars is not None:
        text = text[:max_chars]
    if not text.strip():
        raise ValueError(f"the corpus {path or 'stdlib'} is empty")
    return text


def calibration_tokens(path: str | Path, tokenizer, seq_len: int, max_tokens: int = 16384) -> torch.Tensor:
    """The calibration text file ``path`` (upcycling's router init, composition, pruning,
    merging) as ``[B, seq_len]`` ids of ``tokenizer``, at most ``max_tokens``. A missing
    tokenizer, or a file that is empty or too short for a window, is an error."""
    if tokenizer is None:
        raise ValueError("the source model has no tokenizer.json: moekit cannot read calibration text for it")
    text = load_text(str(path))  # names a missing, empty or non-UTF-8 file
    ids = torch.as_tensor(tokenizer.encode(text)[:max_tokens].astype("int64"))
    if ids.numel() < 2:
        raise ValueError(f"the calibration text {path} gives {ids.numel()} token(s); give a few hundred at least")
    seq_len = min(seq_len, ids.numel())
    return ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)  # [N] -> [B, seq_len]
