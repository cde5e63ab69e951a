"""What one Hugging Face family adapter provides, and the table they register in.

An adapter maps the family's ``config.json`` to and from moekit's config, names its weights,
and says what moekit features it cannot express. Everything the families share (sizes,
heads, RoPE, norms, the router's top-k) is mapped once in ``hf_config.py``; an adapter adds
only what differs. A new family is one file in this folder (it registers itself on import)
plus its test; nothing else in moekit names a ``model_type``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from moekit.config import ModelConfig


class Family:
    """Base of the adapters. Class attributes:

    - ``model_type``, ``architecture``: the names in ``config.json``.
    - ``moe_prefix``: the MoE block's module name in a layer (``block_sparse_moe``, ``mlp``).
    - ``expert_names``: the per-expert (gate, up, down) projection names.
    - ``default_rope_theta``: RoPE's base when the config gives none.
    - ``choose_order``: :func:`moekit.interop.hf_config.choose_family` asks the families in
      this order whether they :meth:`claim` a moekit model (the most specific first).
    - ``zero_qkv_bias``: the family always has q/k/v biases (written as zeros when moekit's
      model has none).
    - ``gated_shared_expert``: the family's shared expert has a sigmoid gate.
    - ``dense``: a dense family (a SwiGLU FFN in every layer, no router); it holds
      ``ModelConfig(dense=True)`` models, the MoE families hold the others.
    """

    model_type: ClassVar[str]
    architecture: ClassVar[str]
    moe_prefix: ClassVar[str] = "mlp"
    expert_names: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    default_rope_theta: ClassVar[float] = 1e4
    choose_order: ClassVar[int] = 100
    zero_qkv_bias: ClassVar[bool] = False
    gated_shared_expert: ClassVar[bool] = False
    dense: ClassVar[bool] = False

    def read_config(self, hf: dict[str, Any], model: dict[str, Any], moe: dict[str, Any]) -> None:
        """Add the family's own fields of ``hf`` to the moekit ``model``/``moe`` field dicts
        (the shared ones are filled already); raise ValueError for what moekit cannot compute."""
        raise NotImplementedError

    def claim(self, config: ModelConfig) -> bool:
        """Whether this family is the natural export of ``config`` (see ``choose_order``)."""
        raise NotImplementedError

    def problems(self, config: ModelConfig) -> list[str]:
        """What of ``config`` this family cannot hold, beyond what no family can (one
        phrase each, empty when it can)."""
        raise NotImplementedError

    def write_config(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        """Add the family's own fields to the ``config.json`` dict ``hf``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Family({self.model_type!r})"


FAMILIES: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: add an adapter to :data:`FAMILIES` under its ``model_type``."""
    if cls.model_type in FAMILIES and type(FAMILIES[cls.model_type]) is not cls:
        raise ValueError(f"model_type {cls.model_type!r} is already registered to {type(FAMILIES[cls.model_type]).__name__}")
    FAMILIES[cls.model_type] = cls()
    return cls


def field(hf: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` present in ``hf`` (families renamed fields across versions)."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise ValueError(f"config.json of model_type {hf.get('model_type')!r} lacks {' or '.join(names)}")


def layered(config: ModelConfig) -> bool:
    """Whether ``config`` has dense feed-forward layers between its MoE layers."""
    return bool(config.first_dense_layers or config.dense_layers or config.moe_every != 1)
