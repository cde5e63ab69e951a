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
