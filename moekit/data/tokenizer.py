"""Tokenizers: bytes by default (no files, nothing to train), BPE as an option.

Both map ``str -> numpy int array`` and back, report ``vocab_size`` and save/load beside a
checkpoint so ``moekit generate`` reads text exactly as training did.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from moekit.io import atomic_write_bytes

TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255. Any text round-trips exactly."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        """Nothing to save: the byte tokenizer has no state."""


class BPETokenizer:
    """Byte-level BPE from the ``tokenizers`` library, trained on the corpus."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        tokenizers = _import_tokenizers()
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_chunks(text), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, directory: str | Path) -> BPETokenizer:
        tokenizers = _import_tokenizers()
        path = Path(directory) / TOKENIZER_FILE
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises its own exception types
            raise ValueError(f"cannot read the BPE tokenizer {path}: {exc}") from None

    def encode(self, text: str) -> np.ndarray:
        ids = [i for enc in self._tok.encode_batch(list(_chunks(text))) for i in enc.ids]
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, directory: str | Path) -> None:

        atomic_write_bytes(Path(directory) / TOKENIZER_FILE, self._tok.to_str().encode("utf-8"))


def _chunks(text: str, size: int = 1 << 16) -> Iterable[str]:
    """Pieces of ~64 KB cut at newlines, so encoding parallelises and no merge spans a cut."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        yield text[start:end]
        start = end


def _import_tokenizers():
    try:
        import tokenizers
        import tokenizers.decoders
        import tokenizers.models
        import tokenizers.pre_tokenizers
        import tokenizers.trainers
    except ImportError:
        raise ImportError("the BPE tokenizer needs the 'tokenizers' package: pip install tokenizers") from None
    return tokenizers


def build_tokenizer(kind: str, text: str | None = None, vocab_size: int = 4096):
    """A new tokenizer of ``kind`` (``"bpe"`` is trained on ``text``)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if text is None:
            raise ValueError("a BPE tokenizer must be trained on text")
        return BPETokenizer.train(text, vocab_size)
    raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {kind!r}")


def load_tokenizer(kind: str, directory: str | Path):
    """The tokenizer a checkpoint in ``directory`` was trained with."""
    return ByteTokenizer() if kind == "byte" else BPETokenizer.load(directory)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32)


__all__ = ["BPETokenizer", "ByteTokenizer", "build_tokenizer", "load_tokenizer", "token_dtype"]
