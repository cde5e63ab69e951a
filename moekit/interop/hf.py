"""Hugging Face directories in and out: :func:`load_hf`, :func:`save_hf`, :func:`convert`,
and :func:`load_model` (a moekit run or an HF directory, whichever ``path`` is).

The state-dict and config mappings are pure functions in ``hf_weights.py`` and
``hf_config.py``; this file does the file work around them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.config import ModelConfig
from moekit.interop.hf_config import (
    check_expressible,
    choose_family,
    config_from_hf,
    config_to_hf,
    family_named,
    family_of,
)
from moekit.interop.hf_weights import from_hf, to_hf
from moekit.interop.safetensors_io import SafetensorsDir, save_safetensors_dir
from moekit.models import Transformer
from moekit.checkpoint import state_dict_for_save

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class LoadedModel:
    """A model ready for inference and what goes with it.

    Attributes:
        model: the :class:`Transformer`, in eval mode.
        tokenizer: an object with ``encode``/``decode`` (``None`` when the directory has none).
        eos_ids: token ids that end a generation (from the HF config; empty for moekit runs).
        source: ``"moekit"`` or the HF ``model_type``.
    """

    model: Transformer
    tokenizer: Any
    eos_ids: list[int]
    source: str


def read_hf_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a Hugging Face model directory")
    try:
        return json.loads(file.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON ({exc})") from None


def is_hf_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a Hugging Face model (a config.json with a ``model_type``)."""
    try:
        return "model_type" in read_hf_config(path)
    except (FileNotFoundError, ValueError):
        return False


def build_from_state(config: ModelConfig, state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                     edit: Callable[[Transformer], Any] | None = None) -> Transformer:
    """A :class:`Transformer` that takes ``state``'s tensors as its weights (no copy, no
    random init: the model is built on the meta device first; ``edit`` changes it there,
    e.g. offloads its experts)."""
    with torch.device("meta"):
        model = Transformer(config)
    if edit is not None:
        edit(model)
    model.load_state_dict(state, strict=True, assign=True)
    model.rope = type(model.rope)(config.dim_per_head, config.max_seq_len, config.rope_theta)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(device).eval()


def load_hf(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_seq_len: int | None = None,
) -> Transformer:
    """Load a Hugging Face directory of any family in :data:`FAMILIES` (Mixtral, Qwen2-MoE,
    Qwen3-MoE, OLMoE; the dense Llama, Mistral, Qwen2) (config.json plus one
    safetensors file or shards with an index) as a moekit :class:`Transformer`.

    Tensors are read one at a time from the files and converted to ``dtype``. ``max_seq_len``
    caps the RoPE tables (default: the config's ``max_position_embeddings``).
    """
    hf_config = read_hf_config(path)
    config = config_from_hf(hf_config, max_seq_len)
    from moekit.budget import check_fits
    from moekit.models import count_model_params

    params = count_model_params(config).total
    check_fits(f"loading {path} ({params:,} parameters as {dtype})", params * dtype.itemsize, str(device))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    return build_from_state(config, read_hf_state(path, hf_config, config, shapes, dtype), device)


def read_hf_state(path: str | Path | SafetensorsDir, hf_config: dict[str, Any], config: ModelConfig,
                  shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32,
                  routed_experts: bool = True) -> dict[str, torch.Tensor]:
    """moekit's state dict of the Hugging Face directory ``path`` (tensor by tensor from its
    safetensors, checked against ``shapes``; a tied head shares the embedding; without
    ``routed_experts`` the routed experts stay unread)."""
    files = path if isinstance(path, SafetensorsDir) else SafetensorsDir(path)
    state = from_hf(files, config, family_of(hf_config), shapes, dtype, routed_experts)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def save_hf(
    model: Transformer,
    path: str | Path,
    model_type: str | None = None,
    tokenizer: Any = None,
    max_shard_bytes: int = 4 << 30,
) -> str:
    """Save ``model`` as a Hugging Face directory that ``transformers`` loads with
    ``from_pretrained`` (same logits). Returns the ``model_type`` written.

    Args:
        model_type: one of :data:`moekit.interop.FAMILIES` (``None``: the family that expresses the model, see
            :func:`choose_family`). A feature the family cannot express is a ValueError.
        tokenizer: a moekit tokenizer; written as ``tokenizer.json`` (the byte tokenizer as a
            byte-level BPE with no merges, ids = byte values).
    """
    from moekit.checkpoint import check_destination

    path = check_destination(path)
    config = model.config
    if model_type is None:
        family = choose_family(config)
    else:
        family = family_named(model_type)
        check_expressible(config, family)
    state = state_dict_for_save(model)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    from moekit.checkpoint import MARKER_FILE, marker_bytes

    files = {CONFIG_FILE: (json.dumps(config_to_hf(config, family, dtype), indent=2) + "\n").encode(),
             MARKER_FILE: marker_bytes("export")}
    if tokenizer is not None:
        files[TOKENIZER_FILE] = tokenizer_json(tokenizer).encode()
    save_safetensors_dir(to_hf(state, config, family), path, files, max_shard_bytes)
    return family.model_type


def tokenizer_json(tokenizer: Any) -> str:
    """``tokenizer.json`` text of a moekit tokenizer (byte or BPE)."""
    if getattr(tokenizer, "kind", None) == "bpe":
        return tokenizer._tok.to_str()
    if getattr(tokenizer, "kind", None) == "byte":
        return byte_tokenizer().to_str()
    raise ValueError(f"cannot write a tokenizer.json for {type(tokenizer).__name__}")


def byte_tokenizer():
    """A ``tokenizers`` Tokenizer equal to :class:`moekit.data.ByteTokenizer`: byte-level
    pre-tokenisation, one vocabulary entry per byte (id = byte value), no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which ByteLevel uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def load_hf_tokenizer(path: str | Path):
    """The directory's ``tokenizer.json`` through the ``tokenizers`` library, or ``None``."""
    from moekit.data.tokenizer import BPETokenizer

    return BPETokenizer.load(path) if (Path(path) / TOKENIZER_FILE).is_file() else None


def _eos_ids(hf_config: dict[str, Any], path: Path) -> list[int]:
    eos = hf_config.get("eos_token_id")
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text("utf-8")).get("eos_token_id", eos)
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    max_seq_len: int | None = None, expert_memory: str | int | None = None, quantize: str | None = None,
    quantize_what: str = "experts", **offload: Any,
) -> LoadedModel:
    """A moekit run directory (or one of its ``step_*`` folders) or a Hugging Face directory,
    ready for inference (:func:`moekit.inference.prepare_for_inference`).

    ``expert_memory`` (bytes, or ``"4GB"``): leave the routed experts in their files and
    hold at most this much of them in memory (:mod:`moekit.inference.offload`); ``offload``
    passes ``policy``, ``prefetch`` and ``counts`` to
    :func:`~moekit.inference.offload.offload_experts`. ``quantize="int8"`` (or ``"int4"``,
    ``"bf16"``): store the routed experts in that format as they load (:mod:`moekit.layers.quantized`;
    ``quantize_what="all"``: the attention and LM head too).
    """
    from moekit.inference import prepare_for_inference
    from moekit.checkpoint import load_trained

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if expert_memory is not None:
        if quantize is not None:
            raise ValueError("quantize and expert_memory do not combine yet: offloading reads float experts")
        return _load_offloaded(path, dtype, device, max_seq_len, expert_memory, offload)
    if offload:
        raise ValueError(f"{sorted(offload)} apply with expert_memory only")
    if is_hf_dir(path):
        hf_config = read_hf_config(path)
        loaded = LoadedModel(load_hf(path, dtype, device, max_seq_len), load_hf_tokenizer(path),
                             _eos_ids(hf_config, path), hf_config["model_type"])
    else:
        model, tokenizer, _ = load_trained(path, device)
        loaded = LoadedModel(model.to(dtype), tokenizer, [], "moekit")
    if quantize is not None:
        from moekit.models.quantize import quantize_model

        quantize_model(loaded.model, quantize, what=quantize_what)
    prepare_for_inference(loaded.model)
    return loaded


def _load_offloaded(path: Path, dtype: torch.dtype, device: str | torch.device, max_seq_len: int | None,
                    expert_memory: str | int, offload: dict[str, Any]) -> LoadedModel:
    """:func:`load_model` with the routed experts left in their files."""
    from moekit.budget import parse_bytes
    from moekit.checkpoint import WEIGHTS_FILE, load_config, run_dir_of
    from moekit.data import load_tokenizer
    from moekit.inference import prepare_for_inference
    from moekit.inference.offload import offload_experts
    from moekit.interop.expert_files import ExpertSource, check_offloadable

    parse_bytes(expert_memory, "expert memory")  # a bad budget fails before any file is read
    if torch.device(device).type != "cpu":
        raise ValueError(f"expert offloading runs on the CPU; got device={device!r}")
    if is_hf_dir(path):
        hf_config = read_hf_config(path)
        config, family, files = config_from_hf(hf_config, max_seq_len), family_of(hf_config), SafetensorsDir(path)
        check_offloadable(config, path)
        source = ExpertSource.for_hf(files, config, family, dtype)
        state = read_hf_state(files, hf_config, config, _resident_shapes(config), dtype, routed_experts=False)
        tokenizer, eos, kind = load_hf_tokenizer(path), _eos_ids(hf_config, path), hf_config["model_type"]
    else:
        run_dir, where = run_dir_of(path)
        run = load_config(run_dir)
        config = run.model
        check_offloadable(config, path)
        if run.lora.rank:
            raise ValueError(f"{path} is a LoRA run: write it merged first (moekit convert {path} DIR), then offload "
                             "DIR's experts")
        source = ExpertSource.for_run(where / WEIGHTS_FILE, config, dtype)
        state = _read_run_state(where / WEIGHTS_FILE, config, dtype)
        tokenizer, eos, kind = load_tokenizer(run.data.tokenizer, run_dir), [], "moekit"
    model = build_from_state(config, state, device, edit=lambda m: offload_experts(m, source, expert_memory, **offload))
    return LoadedModel(prepare_for_inference(model), tokenizer, eos, kind)


def _resident_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shapes of ``Transformer(config)``'s state dict but the routed experts (no memory)."""
    with torch.device("meta"):
        state = Transformer(config).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if ".ffn.experts." not in k}


def _read_run_state(file: Path, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of a moekit checkpoint file but the routed experts (left unread), each
    checked against the model's shapes; a tied head shares the embedding."""
    from moekit.checkpoint import read_weights

    shapes = _resident_shapes(config)
    if config.tie_embeddings:
        shapes.pop("lm_head.weight")  # stored once, as the embedding
    state = read_weights(file, shapes, leave=lambda name: ".ffn.experts." in name, dtype=dtype)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def convert(src: str | Path, dst: str | Path, model_type: str | None = None, overwrite: bool = False) -> str:
    """``moekit convert``: a moekit run -> a Hugging Face directory, or a Hugging Face
    directory -> a moekit run directory (config.json + one checkpoint). Returns a one-line
    description of what was written."""
    from moekit.checkpoint import check_destination

    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"model path {src} does not exist")
    dst = check_destination(dst, (src,), overwrite)  # before the model is even read
    loaded = load_model(src)
    if loaded.source == "moekit":
        written = save_hf(loaded.model, dst, model_type, loaded.tokenizer)
        return f"wrote a {written} Hugging Face directory to {dst}"
    if model_type is not None:
        raise ValueError("model_type applies to moekit -> Hugging Face conversions only")
    save_run(dst, loaded.model, loaded.tokenizer, {"converted_from": str(src)})
    return f"wrote a moekit run directory ({loaded.source} weights) to {dst}"


def run_config_for(model_config: ModelConfig, tokenizer: Any):
    """The :class:`RunConfig` of a run holding a model read from elsewhere: its tokenizer is
    a saved BPE (``tokenizer.json``) or moekit's bytes."""
    from moekit.config import DataConfig, RunConfig, TrainConfig

    data = {"tokenizer": "bpe", "bpe_vocab_size": max(257, tokenizer.vocab_size)} if tokenizer is not None and \
        getattr(tokenizer, "kind", None) == "bpe" else {}
    train = TrainConfig(seq_len=min(TrainConfig.seq_len, model_config.max_seq_len))
    return RunConfig(model=model_config, data=DataConfig(**data), train=train)


def save_run(dst: str | Path, model: Transformer, tokenizer: Any, info: dict[str, Any]) -> None:
    """``model`` (read or made from elsewhere) as a moekit run at ``dst``, with the config of
    :func:`run_config_for` (see :func:`moekit.checkpoint.write_run`; check ``dst`` first)."""
    from moekit.checkpoint import write_run

    write_run(Path(dst), run_config_for(model.config, tokenizer), model, tokenizer, info)
