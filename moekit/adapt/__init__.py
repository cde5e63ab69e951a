"""Start from a model that exists: fine-tune it (which parameters train), put low-rank
adapters on it (attention and experts), upcycle a dense model into an MoE, or compose an MoE
from several dense models."""

from moekit.adapt.compose import compose, compose_to
from moekit.adapt.finetune import finetune_config, freeze
from moekit.adapt.lora import attach_lora, load_adapters, merge_lora, save_adapters
from moekit.adapt.upcycle import function_preserving, upcycle, upcycle_to, upcycled_config

__all__ = ["attach_lora", "compose", "compose_to", "finetune_config", "freeze", "function_preserving",
           "load_adapters", "merge_lora", "save_adapters", "upcycle", "upcycle_to", "upcycled_config"]
