"""Hugging Face interop: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE checkpoints in and out, and
the dense Llama, Mistral and Qwen2 ones (for fine-tuning, upcycling and composition)."""

from moekit.interop.hf import (
    LoadedModel,
    convert,
    is_hf_dir,
    load_hf,
    load_model,
    save_hf,
)
from moekit.interop.families import FAMILIES, Family, register_family
from moekit.interop.hf_config import (
    choose_family,
    config_from_hf,
    config_to_hf,
)
from moekit.interop.hf_weights import from_hf, to_hf
from moekit.interop.safetensors_io import SafetensorsDir, save_safetensors_dir

__all__ = [
    "FAMILIES", "Family", "LoadedModel", "register_family", "SafetensorsDir", "choose_family", "config_from_hf", "config_to_hf", "convert",
    "from_hf", "is_hf_dir", "load_hf", "load_model", "save_hf", "save_safetensors_dir", "to_hf",
]
