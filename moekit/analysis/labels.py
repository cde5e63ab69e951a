"""Labels for the specialisation analysis: the character class of each token, or the
domain (sub-folder) its text came from."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import torch

CHAR_CLASSES = ["letter", "digit", "whitespace", "punctuation", "other"]


def char_class(text: str) -> int:
    """Index into :data:`CHAR_CLASSES` of the first character of ``text``."""
    if not text or text == "\ufffd":
        return 4
    c = text[0]
    if c.isalpha():
        return 0
    if c.isdigit():
        return 1
    if c.isspace():
        return 2
    if unicodedata.category(c).startswith(("P", "S")):
        return 3
    return 4


def token_class_labels(ids: np.ndarray | torch.Tensor, tokenizer) -> torch.Tensor:
    """``[N]`` char-class label of each token id (decoded once per distinct id). For the
    byte tokenizer a byte of a multi-byte character is ``other``."""
    ids = torch.as_tensor(np.asarray(ids)).long()
    table = {int(i): char_class(tokenizer.decode([int(i)])) for i in torch.unique(ids).tolist()}
    lookup = torch.zeros(int(ids.max()) + 1 if ids.numel() else 1, dtype=torch.long)
    for i, c in table.items():
        lookup[i] = c
    return lookup[ids]


def domain_corpus(path: str | Path, tokenizer, suffixes: str = "", max_chars_per_domain: int | None = None,
                  ) -> tuple[list[str], list[torch.Tensor]]:
    """Each sub-folder of ``path`` is a domain: ``(names, [token stream per domain])``, the
    files of a domain read as UTF-8 (a file that is not is an error naming it)."""
    from moekit.data.corpus import load_text

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of domain sub-folders")
    domains = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(domains) < 2:
        raise ValueError(f"{root} must hold at least two sub-folders, one per domain; found "
                         f"{[d.name for d in domains]}")
    streams = []
    for d in domains:
        text = load_text(str(d), suffixes=suffixes, max_chars=max_chars_per_domain)
        streams.append(torch.as_tensor(np.asarray(tokenizer.encode(text)).astype(np.int64)))
    return [d.name for d in domains], streams
