"""The decoder LM: shapes, causality, parameter counts, the dense baseline, the KV cache."""

import dataclasses

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.inference import KVCache, generate
from moekit.models import Transformer, count_model_params
from moekit.presets import preset


def tiny(**kw) -> ModelConfig:
    moe = kw.pop("moe", {})
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base, moe=MoEConfig(d_model=base["d_model"], d_ff=24, num_experts=4, top_k=2, **moe))


def test_shapes_and_output_fields():
    model = Transformer(tiny())
    tokens = torch.randint(0, 50, (3, 7))
    out = model(tokens, targets=tokens)
    assert out.logits.shape == (3, 7, 50)
    assert out.loss.shape == () and out.aux_loss.shape == ()
    assert len(out.layer_stats) == 2 and all(int(s.tokens_per_expert.sum()) == 3 * 7 * 2 for s in out.layer_stats)
    assert out.router_logits[0].shape == (21, 4)
    # untrained: the loss is close to log(vocab)
    assert abs(float(out.loss.detach()) - torch.log(torch.tensor(50.0)).item()) < 0.3


@pytest.mark.parametrize("kw", [{}, {"dense": True}, {"moe": {"router": "hash"}}, {"moe": {"router": "sigmoid_bias"}},
                                {"moe": {"router": "noisy_topk"}}, {"moe": {"num_shared_experts": 1}}])
def test_a_future_token_never_changes_an_earlier_logit(kw):
    # (not with a capacity_factor: which slots overflow depends on every token in the batch)
    model = Transformer(tiny(**kw)).eval()
    tokens = torch.randint(0, 50, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    assert torch.equal(a[:, :8], b[:, :8]) or torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_expert_choice_is_not_causal_and_refuses_generation():
    model = Transformer(tiny(moe={"router": "expert_choice"}))
    assert not model.causal
    with pytest.raises(ValueError, match="cannot generate.*token-choice router"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2)


@pytest.mark.parametrize("kw", [{}, {"dense": True}, {"tie_embeddings": True}, {"moe_every": 2},
                                {"first_dense_layers": 1, "n_layers": 3}, {"n_kv_heads": None, "head_dim": 16},
                                {"moe": {"num_shared_experts": 1, "router": "noisy_topk"}},
                                {"qkv_bias": True, "out_bias": True, "qk_norm": "head", "dense_layers": [0]},
                                {"qk_norm": "full", "head_dim": 16}])
def test_count_model_params_is_exact(kw):
    config = tiny(**kw)
    assert count_model_params(config) == Transformer(config).num_params()


def test_dense_baseline_matches_active_parameters():
    config = preset("small").model
    moe = Transformer(config).num_params()
    dense = Transformer(dataclasses.replace(config, dense=True)).num_params()
    router = config.n_layers * config.moe.num_experts * config.d_model
    # the dense FFN of width top_k * d_ff has exactly the active experts' weights; the MoE
    # adds only its router gates
    assert dense.total == dense.active == moe.active - router
    assert moe.total > 2.5 * moe.active


def test_mixtral_8x7b_count():
    c = count_model_params(preset("mixtral-8x7b").model)
    assert c.total == 46_702_792_704 and c.active == 12_879_925_248  # 46.7B and 12.9B, as published


def test_layer_layout():
    config = tiny(n_layers=6, first_dense_layers=2, moe_every=2)
    assert [config.is_moe_layer(i) for i in range(6)] == [False, False, False, True, False, True]
    model = Transformer(config)
    out = model(torch.randint(0, 50, (1, 4)))
    assert [s is None for s in out.layer_stats] == [True, True, True, False, True, False]


def test_kv_cache_decoding_matches_the_full_forward():
    model = Transformer(tiny()).eval()
    tokens = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full = model(tokens).logits
        cache = KVCache.for_model(model, 2)
        pieces = [model(tokens[:, :4], kv_cache=cache).logits]  # prefill
        pieces.append(model(tokens[:, 4:7], kv_cache=cache).logits)  # a chunk after a prefix
        pieces += [model(tokens[:, i:i + 1], kv_cache=cache).logits for i in range(7, 10)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    model = Transformer(tiny(moe={"num_shared_experts": 1}))
    tokens = torch.randint(0, 50, (4, 16))
    out = model(tokens, targets=tokens)
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_bfloat16_autocast_runs_and_stays_close():
    model = Transformer(tiny())
    tokens = torch.randint(0, 50, (2, 16))
    ref = model(tokens, targets=tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(tokens, targets=tokens)
    low.loss.backward()
    assert abs(float(low.loss.detach()) - float(ref.loss.detach())) < 0.05
    assert model.blocks[0].ffn.experts.w1.grad.dtype == torch.float32


def test_bad_input_is_refused():
    model = Transformer(tiny())
    with pytest.raises(ValueError, match=r"tokens must be \[batch, seq\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="beyond max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_sliding_window_equals_attention_over_the_last_window_only():
    # with window w, the last token's logits equal those of a forward over its last w tokens
    # (positions shifted: RoPE depends only on relative positions, up to float rounding)
    model = Transformer(tiny(sliding_window=4, n_layers=1)).eval()
    tokens = torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        full = model(tokens).logits[0, -1]
        window = model(tokens[:, -4:]).logits[0, -1]
        unwindowed = Transformer(tiny(n_layers=1)).eval()
        unwindowed.load_state_dict(model.state_dict())
        other = unwindowed(tokens).logits[0, -1]
    assert torch.allclose(full, window, atol=1e-5)
    assert not torch.allclose(full, other, atol=1e-3)


def test_left_padding_with_key_mask_and_positions_equals_the_unpadded_sequence():
    model = Transformer(tiny()).eval()
    tokens = torch.randint(0, 50, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], 1)
    mask = torch.tensor([[False] * 3 + [True] * 6])
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(tokens).logits
        pad = model(padded, key_mask=mask, positions=positions).logits[:, 3:]
    assert torch.allclose(plain, pad, atol=1e-5)
