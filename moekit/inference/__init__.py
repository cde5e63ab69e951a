"""Inference outside the model: the KV cache, sampling and the decode loop."""

from moekit.inference.generate import generate, sample_next
from moekit.inference.kv_cache import KVCache

__all__ = ["KVCache", "generate", "sample_next"]
