"""Start from a model that exists: fine-tune it (which parameters train), put low-rank
adapters on it (attention and experts), upcycle a dense model into an MoE, or compose an MoE
from several dense models."""

from moekit.adapt.upcycle import function_preserving, upcycle, upcycle_to, upcycled_config

__all__ = ["function_preserving", "upcycle", "upcycle_to", "upcycled_config"]
