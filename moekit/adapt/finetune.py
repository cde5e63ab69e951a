"""Fine-tuning a model that exists: where its config, weights and tokenizer come from
(``train.init``), and which of its parameters train (``train.trainable``).

``moekit train --init PATH`` reads a moekit run or a Hugging Face directory of any supported
family (MoE or dense); :func:`finetune_config` builds the run's config from it, the
``finetune`` preset's schedule and the user's fields, and the trainer loads the weights
(:func:`load_init_weights`) and freezes what does not train (:func:`freeze`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.config import ModelConfig, RunConfig, check_trainable

# A source that trained with no balancing loss still balances when fine-tuned here (the
# complaint this answers: other stacks silently skip the loss in fine-tuning).
DEFAULT_AUX_LOSS_COEF = 0.01


def parameter_group(name: str) -> str:
    """The :data:`moekit.config.PARAMETER_GROUPS` entry of a parameter of
    :class:`moekit.models.Transformer` (``lora_*`` adapters belong to what they adapt)."""
    if name.startswith(("embed.", "lm_head.")):
        return "embeddings"
    if name.endswith("norm.weight") and ".attn." not in name:
        return "norms"  # attn_norm, ffn_norm, the final norm (q/k norms belong to attention)
    if ".attn." in name:
        return "attention"
    if ".ffn.router." in name or ".ffn.shared_experts.gate." in name:
        return "router"
    if ".ffn." in name:
        return "experts"  # routed and shared experts, and dense FFNs
    raise ValueError(f"parameter {name!r} belongs to no parameter group")


def freeze(model: nn.Module, trainable: str | None) -> tuple[int, int]:
    """Set ``requires_grad`` by ``trainable`` (see ``TrainConfig.trainable``: ``None`` is
    everything, or the adapters alone when the model has LoRA adapters, which always train).
    Returns ``(trainable parameters, all parameters)``; a choice that selects nothing is an
    error."""
    names = [name for name, _ in model.named_parameters()]
    adapted = any(".adapters." in name for name in names)
    groups = set(check_trainable(trainable if trainable is not None else "none" if adapted else "all"))
    on = total = 0
    seen = set()
    for name, p in model.named_parameters():
        train = ".adapters." in name or parameter_group(name) in groups
        p.requires_grad_(train)
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            on += p.numel() if train else 0
    if on == 0:
        raise ValueError(f"train.trainable={trainable!r} selects no parameter of this model "
                         f"(a dense model has no router)")
    return on, total


def source_of(path: str | Path) -> tuple[ModelConfig, Any, str]:
    """``(model config, tokenizer or None, kind)`` of a moekit run or a Hugging Face directory,
    without reading its weights; ``kind`` is ``"moekit"`` or the ``model_type``."""
    from moekit.checkpoint import load_config, run_dir_of
    from moekit.data import load_tokenizer
    from moekit.interop.hf import is_hf_dir, load_hf_tokenizer, read_hf_config
    from moekit.interop.hf_config import config_from_hf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"train.init: model path {path} does not exist")
    if is_hf_dir(path):
        hf = read_hf_config(path)
        return config_from_hf(hf), load_hf_tokenizer(path), hf["model_type"]
    if not path.is_dir():
        raise ValueError(f"train.init: {path} is not a folder (give a moekit run or a Hugging Face directory)")
    run_dir, _ = run_dir_of(path)
    config = load_config(run_dir)
    return config.model, load_tokenizer(config.data.tokenizer, run_dir), "moekit"


@torch.no_grad()
def load_init_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the weights of the moekit run or Hugging Face directory ``path`` into ``model``
    (whose config must be the source's: a ValueError names every tensor that differs)."""
    from moekit.interop.hf import is_hf_dir, read_hf_config, read_hf_state

    path = Path(path)
    if not is_hf_dir(path):
        from moekit.checkpoint import load_config, load_trained, load_weights, run_dir_of

        run_dir, where = run_dir_of(path)
        if not load_config(run_dir).lora.rank:  # straight from the file: no second model in memory
            load_weights(model, where)
            return
        source, _, _ = load_trained(path)  # a LoRA run's adapters come merged
        model.load_state_dict(source.state_dict(), strict=True)
        return
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(read_hf_state(path, read_hf_config(path), model.config, shapes), strict=True)


def check_init_model(config: ModelConfig, source: ModelConfig, path: str | Path) -> None:
    """Refuse a ``config`` whose weights differ in name or shape from those of ``source``,
    the model config of ``train.init`` ``path``."""
    from moekit.models import Transformer

    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in Transformer(source).state_dict().items()}
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        raise ValueError(f"the model config differs from that of train.init {path} in {len(differ)} tensor(s), "
                         f"e.g. {differ[:3]}; build the config with moekit.adapt.finetune_config (moekit train "
                         "--init does) and change only fields that keep the shapes")


def finetune_config(init: str | Path, base: RunConfig | None = None,
                    model_overrides: dict[str, str] | None = None) -> RunConfig:
    """The :class:`RunConfig` of fine-tuning ``init``: the model section from the source (with
    ``model_overrides`` such as ``{"aux_loss_coef": "0.02"}`` applied), the tokenizer kind
    from the source, data and train from ``base`` (default: the ``finetune`` preset), and a
    balancing loss switched on where the source has none."""
    from moekit.config import apply_overrides
    from moekit.presets import preset

    base = base or preset("finetune")
    model, tokenizer, _ = source_of(init)
    if model.moe.aux_loss_coef == 0 and not (model_overrides or {}).get("aux_loss_coef"):
        model = replace(model, moe=replace(model.moe, aux_loss_coef=DEFAULT_AUX_LOSS_COEF))
    tokenizer_kind = "byte" if tokenizer is None or getattr(tokenizer, "kind", "") == "byte" else "bpe"
    if tokenizer is None:
        if model.vocab_size < 256:
            raise ValueError(f"train.init {init} has no tokenizer.json and a vocabulary of {model.vocab_size} "
                             "(< 256): moekit cannot read text for it")
    data = replace(base.data, tokenizer=tokenizer_kind)
    train = replace(base.train, init=str(init), seq_len=min(base.train.seq_len, model.max_seq_len))
    config = RunConfig(model=model, data=data, train=train, parallel=base.parallel, lora=base.lora).to_dict()
    if model_overrides:
        config = apply_overrides(config, {f"model.{k}": v for k, v in model_overrides.items()})
    return RunConfig.from_dict(config)


def check_start(config: RunConfig, init: str | Path | None) -> tuple[Any, str]:
    """What the trainer checks before it writes anything: that ``train.trainable`` selects
    something, that the LoRA targets exist (and are not sharded experts), and that ``init``
    fits ``config.model``. Returns the source's tokenizer (moekit's bytes when it has none)
    and its kind (``None``, ``""`` without ``init``)."""
    from moekit.data import ByteTokenizer
    from moekit.models import Transformer
    from moekit.models.lora import attach_lora

    with torch.device("meta"):
        probe = Transformer(config.model)
        if config.lora.rank:
            if config.parallel.ep > 1 and "experts" in config.lora.target_list():
                raise ValueError("LoRA on experts with expert parallelism (parallel.ep > 1) is not supported: the "
                                 "adapters are not sharded with the experts; use ep 1 or lora.targets attention")
            attach_lora(probe, config.lora)
        freeze(probe, config.train.trainable)
    if init is None:
        return None, ""
    source, tokenizer, kind = source_of(init)
    check_init_model(config.model, source, init)
    tokenizer = tokenizer or ByteTokenizer()
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"train.init {init}: its tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocabulary of {config.model.vocab_size}: they do not belong together")
    return tokenizer, kind
