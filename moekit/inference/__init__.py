"""Inference outside the model: the KV cache, sampling and the decode loop."""

from moekit.inference.decode import Decoder
from moekit.inference.generate import (
    GenerationOutput,
    GenerationStats,
    generate,
    generate_batch,
)
from moekit.inference.kv_cache import KVCache
from moekit.inference.prepare import prepare_for_inference
from moekit.inference.sampling import sample_next

__all__ = ["Decoder", "GenerationOutput", "GenerationStats", "KVCache", "generate", "generate_batch", "prepare_for_inference", "sample_next"]
