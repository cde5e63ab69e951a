"""Named starting configurations. Each is a plain function returning a :class:`RunConfig`;
``moekit train --preset NAME`` starts from one and command-line fields override it.

- ``tiny``: a few hundred thousand parameters, for tests (seconds).
- ``small``: a few million parameters that learn something useful on 2 CPU cores in minutes.
- ``finetune``: the schedule for ``moekit train --init`` (the model comes from the source).
- ``mixtral-8x7b``: Mixtral 8x7B's shape, for parameter counting (46.7B total, 12.9B active).
"""

from __future__ import annotations

from collections.abc import Callable

from moekit.config import DataConfig, ModelConfig, MoEConfig, RunConfig, TrainConfig


def tiny() -> RunConfig:
    model = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                        moe=MoEConfig(d_model=64, d_ff=64, num_experts=4, top_k=2))
    train = TrainConfig(batch_size=4, seq_len=64, max_steps=20, warmup_steps=5, lr=3e-3,
                        eval_every=10, eval_batches=2, log_every=5, checkpoint_every=10)
    return RunConfig(model=model, data=DataConfig(max_chars=200_000), train=train)


def small() -> RunConfig:
    # d_model 128: a few minutes on 2 CPU cores leave the model capacity-bound, where extra
    # experts pay (benchmarks/moe_vs_dense.py; the wider variants tried are in docs/benchmarks.md)
    model = ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256,
                        moe=MoEConfig(d_model=128, d_ff=256, num_experts=8, top_k=2))
    train = TrainConfig(batch_size=16, seq_len=256, max_steps=600, warmup_steps=50, lr=3e-3,
                        eval_every=200, eval_batches=20, log_every=10, checkpoint_every=200)
    return RunConfig(model=model, data=DataConfig(), train=train)


def finetune() -> RunConfig:
    """The schedule of ``moekit train --init`` (the model comes from the source): a learning
    rate well below a from-scratch run's, a short warmup, light weight decay on matrices
    only (never on norms or biases), the balancing losses on."""
    train = TrainConfig(batch_size=8, seq_len=256, max_steps=300, warmup_steps=20, lr=1e-4, min_lr_ratio=0.1,
                        weight_decay=0.01, eval_every=100, eval_batches=10, log_every=10, checkpoint_every=100)
    return RunConfig(model=small().model, data=DataConfig(), train=train)


def mixtral_8x7b() -> RunConfig:
    model = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        max_seq_len=32768, rope_theta=1e6,
                        moe=MoEConfig(d_model=4096, d_ff=14336, num_experts=8, top_k=2))
    return RunConfig(model=model, data=DataConfig(), train=TrainConfig(seq_len=4096))


PRESETS: dict[str, Callable[[], RunConfig]] = {"tiny": tiny, "small": small, "finetune": finetune,
                                               "mixtral-8x7b": mixtral_8x7b}


def preset(name: str) -> RunConfig:
    """The preset called ``name``; a ValueError lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    return PRESETS[name]()
