"""Configuration dataclasses.

One dataclass per concern: :class:`MoEConfig` (one MoE layer), :class:`ModelConfig` (the
decoder LM, holding its ``moe``), :class:`DataConfig`, :class:`TrainConfig`, and
:class:`RunConfig` tying the last three together. Every field has a docstring;
``__post_init__`` validates and raises ``ValueError`` naming the field and what is allowed,
so a bad config fails at construction rather than deep inside a forward pass.

``RunConfig.from_dict`` reads nested dicts (JSON/TOML) and rejects unknown fields with the
list of valid ones; :func:`apply_overrides` applies ``section.field=value`` strings from the
command line.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from moekit.registry import ROUTERS, expert_names, router_names

IMPLEMENTATIONS = ("fast", "reference")
QK_NORMS = (None, "head", "full")


# The largest value each size may take: far above any model that exists, far below what
# would hang or overflow an allocation before the memory estimate can refuse it.
BOUNDS = {"d_model": 1 << 17, "d_ff": 1 << 20, "num_experts": 1 << 14, "top_k": 1 << 14, "d_ff_shared": 1 << 20,
          "num_shared_experts": 1 << 10, "sinkhorn_iters": 1000, "n_groups": 1 << 14, "topk_groups": 1 << 14,
          "vocab_size": 1 << 24, "n_layers": 1 << 12, "n_heads": 1 << 12, "n_kv_heads": 1 << 12,
          "head_dim": 1 << 12, "max_seq_len": 1 << 22, "moe_every": 1 << 12, "dense_d_ff": 1 << 20,
          "sliding_window": 1 << 22, "batch_size": 1 << 20, "seq_len": 1 << 22, "grad_accum": 1 << 16,
          "max_steps": 1 << 40, "eval_batches": 1 << 20, "keep_checkpoints": 1 << 10}


def _positive(name: str, value: Any, kind: type = int) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool) and value > 0
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")
    most = BOUNDS.get(name.rsplit(".", 1)[-1])
    if most is not None and value > most:
        raise ValueError(f"{name} must be in 1..{most:,}, got {value:,}")


def _non_negative(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass
class MoEConfig:
    """Configuration of one sparse Mixture-of-Experts feed-forward layer."""

    d_model: int
    """Width of the input and output (the residual stream)."""
    d_ff: int
    """Hidden width of each routed expert."""
    num_experts: int = 8
    """Number of routed experts E."""
    top_k: int = 2
    """Experts per token for token-choice routers; for ``expert_choice`` the average
    number of experts per token (its capacity is ``top_k * T / E`` tokens per expert)."""
    router: str = "topk"
    """Router name from the registry (see ``moekit.registry.router_names()``)."""
    expert: str = "swiglu"
    """Expert kind from the registry: ``"swiglu"`` (Mixtral) or ``"gelu"``."""
    num_shared_experts: int = 0
    """Always-active shared experts (DeepSeek/Qwen style) added to the routed output."""
    d_ff_shared: int | None = None
    """Hidden width of each shared expert; ``None`` means ``d_ff``."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by ``sigmoid(x @ w)`` (Qwen2-MoE)."""
    capacity_factor: float | None = None
    """``None`` = dropless (default). Otherwise each expert takes at most
    ``ceil(capacity_factor * T * top_k / E)`` tokens; overflow is dropped by router priority.
    For ``expert_choice`` it scales the per-expert capacity (default 1.0)."""
    renormalize: bool = True
    """Renormalise the top-k weights to sum to 1 (Mixtral); ``False`` keeps the raw probabilities."""
    aux_loss_coef: float = 0.01
    """Coefficient of the Switch/GShard load-balancing loss (0 disables it)."""
    z_loss_coef: float = 0.001
    """Coefficient of the ST-MoE router z-loss (0 disables it)."""
    seq_aux_loss_coef: float = 0.0
    """Coefficient of the DeepSeek-V3 sequence-wise balancing loss (0 disables it)."""
    router_jitter: float = 0.0
    """Multiplicative jitter ``U(1-j, 1+j)`` on the router input, training only."""
    router_bias: bool = False
    """Give the router's linear gate a bias term."""
    bias_update_rate: float = 0.001
    """``sigmoid_bias``: step of the aux-loss-free bias update (DeepSeek-V3's gamma)."""
    n_groups: int = 1
    """``sigmoid_bias``: number of expert groups for group-limited routing."""
    topk_groups: int = 1
    """``sigmoid_bias``: groups each token may pick experts from."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routed experts' weights (DeepSeek-V3 uses 2.5)."""
    sinkhorn_iters: int = 3
    """``sinkhorn``: Sinkhorn normalisation iterations during training."""
    implementation: str = "fast"
    """``"fast"`` (sort and grouped matmul) or ``"reference"`` (slow dense loop, for tests)."""
    check_inputs: bool = False
    """Debug mode: validate input width and finiteness on every forward (costs a sync)."""
    skip_below: float = 0.0
    """Inference only: a chosen expert whose weight is below this is not computed, and the
    other chosen experts' weights are scaled up to the same total (dynamic skipping; the
    likeliest expert is always kept). 0 computes every chosen expert."""
    weight_format: str | None = None
    """Inference only: the routed experts' weights stored in ``"bf16"``, ``"int8"`` or
    ``"int4"`` (:mod:`moekit.layers.quantized`; ``moekit quantize`` sets it). ``None``: the model's dtype."""
    weight_group_size: int = 32
    """``int4``: weights sharing one scale along the input width (must divide it)."""

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k", "sinkhorn_iters", "n_groups", "topk_groups"):
            _positive(name, getattr(self, name))
        _non_negative("num_shared_experts", self.num_shared_experts)
        if not isinstance(self.num_shared_experts, int):
            raise ValueError(f"num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}")
        if self.d_ff_shared is not None:
            _positive("d_ff_shared", self.d_ff_shared)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in 1..num_experts (1..{self.num_experts}), got {self.top_k}"
            )
        routers = router_names()
        if self.router not in routers:
            raise ValueError(f"router must be one of {routers}, got {self.router!r}")
        experts = expert_names()
        if self.expert not in experts:
            raise ValueError(f"expert must be one of {experts}, got {self.expert!r}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got {self.implementation!r}")
        if self.weight_format is not None:
            from moekit.ops.lowp import get_format

            fmt = get_format(self.weight_format)
            if self.expert != "swiglu":
                raise ValueError(f"weight_format={self.weight_format!r} applies to SwiGLU experts, not {self.expert!r}")
            _positive("weight_group_size", self.weight_group_size)
            for shape in ((self.d_ff, self.d_model), (self.d_model, self.d_ff)):
                fmt.check(shape, self.weight_group_size)
        if self.capacity_factor is not None:
            _positive("capacity_factor", self.capacity_factor, float)
        for name in ("aux_loss_coef", "z_loss_coef", "seq_aux_loss_coef", "bias_update_rate"):
            _non_negative(name, getattr(self, name))
        _positive("routed_scaling_factor", self.routed_scaling_factor, float)
        if not (isinstance(self.skip_below, (int, float)) and 0 <= self.skip_below < 1):
            raise ValueError(f"skip_below must be in [0, 1), got {self.skip_below!r}")
        if not (isinstance(self.router_jitter, (int, float)) and 0 <= self.router_jitter < 1):
            raise ValueError(f"router_jitter must be in [0, 1), got {self.router_jitter!r}")
        ROUTERS[self.router].check_config(self)  # each router's own rules (top-1 for switch, groups...)

    @property
    def shared_width(self) -> int:
        """Hidden width of all shared experts together (they act as one wider FFN)."""
        return self.num_shared_experts * (self.d_ff_shared or self.d_ff)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        return cls(**_known_fields(cls, data))


def _known_fields(cls: type, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``data`` unchanged, or a ValueError naming the unknown keys and the valid ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__} must be a table/dict of fields, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        label = f"{where} " if where else ""
        raise ValueError(f"unknown {cls.__name__} {label}field(s) {unknown}; valid fields are {sorted(known)}")
    return data


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


@dataclass
class ModelConfig:
    """A Mixtral-style decoder-only language model.

    Blocks are pre-norm: RMSNorm -> causal self-attention (RoPE, grouped-query) -> RMSNorm ->
    feed-forward. The feed-forward is the MoE layer ``moe`` in MoE layers and a dense SwiGLU
    FFN of width ``dense_d_ff`` elsewhere (and everywhere when ``dense=True``).
    """

    vocab_size: int = 256
    """Token vocabulary size (set from the tokenizer by ``moekit train``)."""
    d_model: int = 256
    """Residual stream width. ``moe.d_model`` always follows it."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads per attention layer."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); ``None`` means ``n_heads`` (plain MHA)."""
    head_dim: int | None = None
    """Width of one head; ``None`` means ``d_model // n_heads``."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (RoPE tables and the KV cache are this long)."""
    rope_theta: float = 10000.0
    """RoPE base frequency (Mixtral uses 1e6)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the token embedding and the LM head weight."""
    dense: bool = False
    """Dense baseline: every feed-forward is one SwiGLU FFN of width ``dense_d_ff`` (which
    defaults to ``top_k * d_ff``, matching the MoE's active parameters and FLOPs per token)."""
    moe_every: int = 1
    """Use an MoE feed-forward in every n-th layer (counted after ``first_dense_layers``)."""
    first_dense_layers: int = 0
    """The first this-many layers use a dense FFN (DeepSeek-V3 uses 3)."""
    dense_d_ff: int | None = None
    """Width of the dense FFN; ``None`` means ``moe.top_k * moe.d_ff``."""
    dense_layers: list[int] = field(default_factory=list)
    """These layers (0-based) use a dense FFN whatever ``moe_every`` says (Qwen-MoE's
    ``mlp_only_layers``)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2-MoE)."""
    out_bias: bool = False
    """A bias on the attention output projection."""
    qk_norm: str | None = None
    """RMSNorm on queries and keys before RoPE: ``None``, ``"head"`` (over each head,
    Qwen3-MoE) or ``"full"`` (over the whole projection, OLMoE)."""
    clip_qkv: float | None = None
    """Clamp queries, keys and values to ``[-clip_qkv, clip_qkv]`` (OLMoE option)."""
    sliding_window: int | None = None
    """Each token attends to at most this many most recent tokens (Mixtral's option)."""
    linear_format: str | None = None
    """Inference only: the attention projections and the (untied) LM head stored in
    ``"bf16"``, ``"int8"`` or ``"int4"`` (``moekit quantize --what all``; int4 groups of
    ``moe.weight_group_size``). ``None``: the model's dtype."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (output projections are scaled by
    ``1/sqrt(2 * n_layers)``, as in GPT-2)."""
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(d_model=256, d_ff=256))
    """The MoE feed-forward (a dict is accepted and converted)."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            moe = dict(_known_fields(MoEConfig, self.moe, "moe"))
            moe["d_model"] = self.d_model
            moe.setdefault("d_ff", self.d_model)
            self.moe = MoEConfig(**moe)
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(f"moe must be an MoEConfig or a dict of its fields, got {type(self.moe).__name__}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "moe_every"):
            _positive(name, getattr(self, name))
        for name in ("n_kv_heads", "head_dim", "dense_d_ff"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        _positive("rope_theta", self.rope_theta, float)
        if self.linear_format is not None:
            from moekit.ops.lowp import get_format

            fmt = get_format(self.linear_format)
            H, Hkv, hd = self.n_heads, self.n_kv_heads or self.n_heads, self.head_dim or self.d_model // self.n_heads
            for shape in ((H * hd, self.d_model), (Hkv * hd, self.d_model), (self.d_model, H * hd),
                          (self.vocab_size, self.d_model)):
                fmt.check(shape, self.moe.weight_group_size)
        _positive("norm_eps", self.norm_eps, float)
        _positive("init_std", self.init_std, float)
        if not isinstance(self.first_dense_layers, int) or not 0 <= self.first_dense_layers <= self.n_layers:
            raise ValueError(f"first_dense_layers must be in 0..n_layers (0..{self.n_layers}), got {self.first_dense_layers!r}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}), or set head_dim")
        if (self.head_dim or self.d_model // self.n_heads) % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim or self.d_model // self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads ({self.kv_heads}) must divide n_heads ({self.n_heads})")
        if self.moe.d_model != self.d_model:
            self.moe = replace(self.moe, d_model=self.d_model)
        _check_choice("qk_norm", self.qk_norm, QK_NORMS)
        for name in ("clip_qkv", "sliding_window"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name), float if name == "clip_qkv" else int)
        if not isinstance(self.dense_layers, (list, tuple)):
            raise ValueError(f"dense_layers must be a list of layer indices, got {self.dense_layers!r}")
        self.dense_layers = list(self.dense_layers)
        bad = [i for i in self.dense_layers if not isinstance(i, int) or not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"dense_layers must hold layer indices in 0..{self.n_layers - 1}, got {bad}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ffn_width(self) -> int:
        """Width of the dense FFN (dense layers and the dense baseline)."""
        return self.dense_d_ff or self.moe.top_k * self.moe.d_ff

    def is_moe_layer(self, i: int) -> bool:
        """Whether block ``i`` (0-based) has an MoE feed-forward."""
        if self.dense or i < self.first_dense_layers or i in self.dense_layers:
            return False
        return (i - self.first_dense_layers) % self.moe_every == self.moe_every - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**_known_fields(cls, data, "model"))


@dataclass
class DataConfig:
    """Where the training text comes from and how it becomes tokens."""

    path: str | None = None
    """A text file or a folder of text files (read recursively as UTF-8). ``None``: the
    running Python's standard library ``.py`` sources (about 30 MB, on every machine)."""
    tokenizer: str = "byte"
    """``"byte"`` (256 ids, no files needed) or ``"bpe"`` (trained on the corpus with the
    ``tokenizers`` library and saved beside the checkpoint)."""
    bpe_vocab_size: int = 4096
    """Vocabulary size of the BPE tokenizer."""
    val_fraction: float = 0.1
    """The last this fraction of the token stream is the validation split."""
    max_chars: int | None = None
    """Read at most this many characters of the corpus (quick experiments, tests)."""
    suffixes: str = ".txt,.md,.py,.rst"
    """File suffixes read when ``path`` is a folder (comma-separated; empty = every file)."""

    def __post_init__(self) -> None:
        _check_choice("tokenizer", self.tokenizer, TOKENIZERS)
        _positive("bpe_vocab_size", self.bpe_vocab_size)
        if self.bpe_vocab_size < 257:
            raise ValueError(f"bpe_vocab_size must be >= 257 (the 256 bytes plus merges), got {self.bpe_vocab_size}")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.max_chars is not None:
            _positive("max_chars", self.max_chars)


TOKENIZERS = ("byte", "bpe")
PARAMETER_GROUPS = ("embeddings", "norms", "attention", "router", "experts")
TRAINABLE_WORDS = ("all", "all_but_embeddings", "none") + PARAMETER_GROUPS


def check_trainable(spec: str) -> list[str]:
    """The parameter groups ``TrainConfig.trainable`` names; a ValueError lists what is allowed."""
    words = [w.strip() for w in str(spec).split(",") if w.strip()] if isinstance(spec, str) else []
    bad = [w for w in words if w not in TRAINABLE_WORDS]
    if not words or bad:
        raise ValueError(f"trainable must be 'all', 'all_but_embeddings', 'none' or a comma-separated list of "
                         f"{list(PARAMETER_GROUPS)}, got {spec!r}")
    groups: set[str] = set()
    for w in (w for w in words if w != "none"):
        groups |= set(PARAMETER_GROUPS) if w == "all" else set(PARAMETER_GROUPS[1:]) if w == "all_but_embeddings" \
            else {w}
    return [g for g in PARAMETER_GROUPS if g in groups]
DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    """The optimisation loop: AdamW, warmup then cosine decay, clipping, accumulation."""

    batch_size: int = 16
    """Sequences per micro-batch."""
    seq_len: int = 256
    """Tokens per training sequence (at most ``model.max_seq_len``)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 1000
    """Optimizer steps to run (the cosine schedule ends here)."""
    time_budget: float | None = None
    """Stop after this many seconds of training, then evaluate. The schedule then decays by
    whichever of steps or time is further along."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine decays to ``lr * min_lr_ratio``."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; norms, biases and router biases are not decayed)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    dtype: str = "float32"
    """Compute dtype: ``"float32"`` or ``"bfloat16"`` (autocast; weights stay float32)."""
    compile: bool = False
    """Wrap the model in ``torch.compile``."""
    device: str = "auto"
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``..."""
    seed: int = 0
    """Seeds the weights, the batch order and every random choice."""
    eval_every: int = 200
    """Evaluate on the validation split every this many steps (and at the end)."""
    eval_batches: int = 20
    """Validation batches per evaluation (fixed windows spread over the split)."""
    log_every: int = 10
    """Write a metrics.jsonl line every this many steps."""
    checkpoint_every: int = 200
    """Write a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the oldest are deleted)."""
    progress: bool = True
    """Show a progress bar."""
    init: str | None = None
    """Start from this model's weights instead of a random init: a moekit run (or one of its
    ``step_*`` folders) or a Hugging Face directory of any supported family. The model
    section and the tokenizer come from it (``moekit train --init PATH``)."""
    trainable: str | None = None
    """What trains in full: ``"all"``, ``"all_but_embeddings"``, ``"none"``, or a
    comma-separated list of ``embeddings``, ``norms``, ``attention``, ``router``, ``experts``
    (the routed and shared experts, and dense FFNs). ``None``: everything, or with LoRA
    adapters the adapters alone. Adapters always train; frozen parameters get no gradient
    and no optimizer state."""

    def __post_init__(self) -> None:
        if self.trainable is not None:
            check_trainable(self.trainable)
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_every", "eval_batches",
                     "log_every", "checkpoint_every", "keep_checkpoints"):
            _positive(name, getattr(self, name))
        if self.time_budget is not None:
            _positive("time_budget", self.time_budget, float)
        _positive("lr", self.lr, float)
        for name in ("weight_decay", "grad_clip", "warmup_steps"):
            _non_negative(name, getattr(self, name))
        for name in ("min_lr_ratio", "beta1", "beta2"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1 or (name == "min_lr_ratio" and v == 1)):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        _check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")


LORA_TARGETS = ("attention", "experts", "ffn")


@dataclass
class LoRAConfig:
    """Low-rank adapters (``--lora.rank 8 --lora.targets attention,experts``); rank 0: none.

    With adapters, the base weights are frozen: only the adapters train, plus the groups
    ``train.trainable`` names (``--train.trainable router`` trains the router in full)."""

    rank: int = 0
    """Rank r of every adapter (0: no adapters)."""
    alpha: float = 16.0
    """The adapters' output is scaled by ``alpha / rank``."""
    dropout: float = 0.0
    """Dropout on each adapter's input, training only."""
    targets: str = "attention,experts"
    """Comma-separated: ``attention`` (q/k/v/o projections), ``experts`` (the routed experts'
    3-D weights, per expert), ``ffn`` (dense FFNs and shared experts)."""

    def __post_init__(self) -> None:
        _non_negative("rank", self.rank)
        if not isinstance(self.rank, int) or self.rank > 1 << 14:
            raise ValueError(f"rank must be an int in 0..{1 << 14} (0: no adapters), got {self.rank!r}")
        _positive("alpha", self.alpha, float)
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.target_list()

    def target_list(self) -> list[str]:
        words = [w.strip() for w in str(self.targets).split(",") if w.strip()]
        bad = [w for w in words if w not in LORA_TARGETS]
        if not words or bad:
            raise ValueError(f"targets must be a comma-separated list of {list(LORA_TARGETS)}, got {self.targets!r}")
        return words


@dataclass
class ParallelConfig:
    """How a run launched with ``torchrun`` spreads over its processes."""

    ep: int = 1
    """Expert-parallel degree: each process holds ``num_experts / ep`` experts; the world
    size divided by ``ep`` is the data-parallel degree (experts replicated that many times)."""

    def __post_init__(self) -> None:
        _positive("ep", self.ep)


@dataclass
class RunConfig:
    """Everything ``moekit train`` needs; saved as ``config.json`` beside the weights."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) must be <= model.max_seq_len ({self.model.max_seq_len})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = _known_fields(cls, data, "top-level")
        return cls(
            model=ModelConfig.from_dict(data.get("model", {})),
            data=DataConfig(**_known_fields(DataConfig, data.get("data", {}), "data")),
            train=TrainConfig(**_known_fields(TrainConfig, data.get("train", {}), "train")),
            parallel=ParallelConfig(**_known_fields(ParallelConfig, data.get("parallel", {}), "parallel")),
            lora=LoRAConfig(**_known_fields(LoRAConfig, data.get("lora", {}), "lora")),
        )


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "parallel": ParallelConfig,
            "lora": LoRAConfig}


def parse_value(text: str, hint: Any, name: str) -> Any:
    """Convert command-line ``text`` to the field type ``hint`` (int, float, bool, str, X | None)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if union else ()
    if text.lower() == "none" and type(None) in args:
        return None
    kind = next((a for a in args if a is not type(None)), hint)
    if typing.get_origin(kind) is list:  # "1,3" -> [1, 3]
        item = typing.get_args(kind)[0]
        try:
            return [item(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"{name} expects a comma-separated list of {item.__name__}, got {text!r}") from None
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
    else:
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{name} expects a {getattr(kind, '__name__', kind)}, got {text!r}")


def apply_overrides(config: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    """Apply ``{"model.num_experts": "16", "train.lr": "3e-3"}`` to a nested config dict.

    ``model.X`` also reaches the MoE fields (``model.num_experts`` is ``model.moe.num_experts``).
    Unknown sections or fields raise ``ValueError`` listing the valid ones. Returns a new dict.
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for key, text in overrides.items():
        parts = key.split(".")
        section = parts[0]
        if section not in SECTIONS or len(parts) not in (2, 3):
            raise ValueError(f"unknown config key {key!r}; use SECTION.FIELD with SECTION one of {list(SECTIONS)}")
        cls, target = SECTIONS[section], out.setdefault(section, {})
        name = parts[-1]
        moe_field = section == "model" and (len(parts) == 3 and parts[1] == "moe" or
                                            len(parts) == 2 and name not in _names(ModelConfig))
        if len(parts) == 3 and not moe_field:
            raise ValueError(f"unknown config key {key!r}; only model.moe.FIELD has three parts")
        if moe_field:
            cls = MoEConfig
            target = out["model"].setdefault("moe", {})
            target = out["model"]["moe"] = dict(asdict(target) if isinstance(target, MoEConfig) else target)
        if name not in _names(cls) or (cls is ModelConfig and name == "moe"):
            valid = sorted(_names(SECTIONS[section]) - {"moe"})
            if section == "model":
                valid = sorted(set(valid) | (_names(MoEConfig) - {"d_model"}))
            raise ValueError(f"unknown field {section}.{name}; valid {section} fields are {valid}")
        if cls is MoEConfig and name == "d_model":
            raise ValueError("moe.d_model follows model.d_model; set model.d_model instead")
        target[name] = parse_value(text, typing.get_type_hints(cls)[name], key)
    return out


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}
