"""Every invalid config field fails at construction with a message naming it."""

import pytest

from moekit import MoEConfig


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"d_model": 0}, "d_model must be a positive int"),
        ({"d_ff": -3}, "d_ff must be a positive int"),
        ({"d_model": 2.5}, "d_model must be a positive int"),
        ({"num_experts": 0}, "num_experts must be a positive int"),
        ({"top_k": 0}, "top_k must be a positive int"),
        ({"top_k": 9}, r"top_k must be in 1..num_experts \(1..8\)"),
        ({"router": "nope"}, r"router must be one of \['expert_choice', 'hash'"),
        ({"expert": "relu"}, r"expert must be one of \['gelu', 'swiglu'\]"),
        ({"num_shared_experts": -1}, "num_shared_experts must be"),
        ({"d_ff_shared": 0}, "d_ff_shared must be a positive int"),
        ({"capacity_factor": 0.0}, "capacity_factor must be a positive float"),
        ({"capacity_factor": float("nan")}, "capacity_factor must be a positive float"),
        ({"aux_loss_coef": -1.0}, "aux_loss_coef must be a finite number >= 0"),
        ({"z_loss_coef": float("inf")}, "z_loss_coef must be a finite number >= 0"),
        ({"seq_aux_loss_coef": -0.1}, "seq_aux_loss_coef must be"),
        ({"router_jitter": 1.0}, r"router_jitter must be in \[0, 1\)"),
        ({"bias_update_rate": -1e-3}, "bias_update_rate must be"),
        ({"routed_scaling_factor": 0}, "routed_scaling_factor must be a positive float"),
        ({"sinkhorn_iters": 0}, "sinkhorn_iters must be a positive int"),
        ({"implementation": "turbo"}, r"implementation must be one of \['fast', 'reference'\]"),
        ({"router": "switch", "top_k": 2}, "top_k must be 1 for router 'switch'"),
        ({"router": "sigmoid_bias", "n_groups": 3}, "n_groups must divide num_experts"),
        ({"router": "sigmoid_bias", "n_groups": 4, "topk_groups": 5}, "topk_groups must be in 1..n_groups"),
        ({"router": "topk", "n_groups": 2}, "n_groups > 1 is only supported by router 'sigmoid_bias'"),
        ({"router": "sigmoid_bias", "n_groups": 4, "topk_groups": 1, "top_k": 3}, r"top_k \(3\) must be <= topk_groups"),
    ],
)
def test_invalid_fields(kw, match):
    base = {"d_model": 8, "d_ff": 16}
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**base, **kw})


def test_round_trip_and_unknown_fields():
    cfg = MoEConfig(d_model=8, d_ff=16, router="sigmoid_bias", n_groups=2)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown MoEConfig field\(s\) \['experts'\]; valid fields are"):
        MoEConfig.from_dict({"d_model": 8, "d_ff": 16, "experts": 4})


# ---- model, data, train and run configs ----

from moekit.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
)


@pytest.mark.parametrize(
    "cls, kw, match",
    [
        (ModelConfig, {"n_layers": 0}, "n_layers must be a positive int"),
        (ModelConfig, {"n_heads": 3}, r"n_heads \(3\) must divide d_model \(256\)"),
        (ModelConfig, {"n_kv_heads": 3}, r"n_kv_heads \(3\) must divide n_heads \(4\)"),
        (ModelConfig, {"head_dim": 7}, "head_dim must be even for RoPE"),
        (ModelConfig, {"first_dense_layers": 5}, r"first_dense_layers must be in 0..n_layers \(0..4\)"),
        (ModelConfig, {"rope_theta": -1.0}, "rope_theta must be a positive float"),
        (ModelConfig, {"moe": {"num_expert": 4}}, r"unknown MoEConfig moe field\(s\) \['num_expert'\]"),
        (DataConfig, {"tokenizer": "word"}, r"tokenizer must be one of \['byte', 'bpe'\]"),
        (DataConfig, {"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\)"),
        (DataConfig, {"bpe_vocab_size": 100}, "bpe_vocab_size must be >= 257"),
        (TrainConfig, {"lr": 0.0}, "lr must be a positive float"),
        (TrainConfig, {"dtype": "float16"}, r"dtype must be one of \['float32', 'bfloat16'\]"),
        (TrainConfig, {"beta2": 1.0}, r"beta2 must be in \[0, 1\)"),
        (TrainConfig, {"time_budget": 0}, "time_budget must be a positive float"),
        (TrainConfig, {"grad_accum": 0}, "grad_accum must be a positive int"),
    ],
)
def test_run_config_sections_validate(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(**kw)


def test_moe_width_follows_the_model_and_dicts_round_trip():
    m = ModelConfig(d_model=128, moe={"d_ff": 64, "num_experts": 16})
    assert m.moe.d_model == 128 and m.moe.num_experts == 16 and m.ffn_width == 2 * 64
    run = RunConfig(model=m)
    assert RunConfig.from_dict(run.to_dict()) == run
    with pytest.raises(ValueError, match=r"unknown RunConfig top-level field\(s\) \['optim'\]"):
        RunConfig.from_dict({"optim": {}})


def test_overrides_reach_moe_fields_and_parse_types():
    base = RunConfig().to_dict()
    out = apply_overrides(base, {"model.num_experts": "16", "model.moe.top_k": "4", "train.time_budget": "none",
                                 "train.compile": "yes", "model.dense_d_ff": "96", "data.path": "notes/"})
    run = RunConfig.from_dict(out)
    assert run.model.moe.num_experts == 16 and run.model.moe.top_k == 4 and run.model.dense_d_ff == 96
    assert run.train.time_budget is None and run.train.compile is True and run.data.path == "notes/"
    assert base["model"]["moe"]["num_experts"] == 8  # the input is not modified
    with pytest.raises(ValueError, match="moe.d_model follows model.d_model"):
        apply_overrides(base, {"model.moe.d_model": "64"})
    with pytest.raises(ValueError, match="train.compile expects a bool"):
        apply_overrides(base, {"train.compile": "maybe"})
    with pytest.raises(ValueError, match=r"SECTION one of \['model', 'data', 'train', 'parallel', 'lora'\]"):
        apply_overrides(base, {"lr": "1"})
