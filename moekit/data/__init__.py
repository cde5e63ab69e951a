"""Data: tokenizers, corpora and deterministic batching."""

from moekit.data.batches import TokenSplits, eval_batches, train_batch
from moekit.data.corpus import load_text, stdlib_files
from moekit.data.tokenizer import (
           BPETokenizer,
           ByteTokenizer,
           build_tokenizer,
           load_tokenizer,
)

__all__ = [
           "BPETokenizer",
           "ByteTokenizer",
           "TokenSplits",
           "build_tokenizer",
           "eval_batches",
           "load_text",
           "load_tokenizer",
           "stdlib_files",
           "train_batch",
]
