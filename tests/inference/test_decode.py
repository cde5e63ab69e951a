"""The lean decode step against the model's generic forward (the reference)."""

import pytest
import torch

from moekit import kernels
from moekit.config import ModelConfig, MoEConfig
from moekit.inference import KVCache, generate_batch, prepare_for_inference
from moekit.inference.decode import Decoder
from moekit.models import Transformer

CASES = {
    "mixtral": {},
    "no renormalise, router bias, scaled": dict(moe=dict(renormalize=False, router_bias=True, routed_scaling_factor=2.5)),
    "switch": dict(moe=dict(router="switch", top_k=1)),
    "hash": dict(moe=dict(router="hash", top_k=1)),
    "sigmoid_bias groups": dict(moe=dict(router="sigmoid_bias", n_groups=2, topk_groups=1)),
    "gelu experts": dict(moe=dict(expert="gelu")),
    "shared experts, gate": dict(moe=dict(num_shared_experts=1, shared_expert_gate=True)),
    "dense layers, biases, mha": dict(first_dense_layers=1, qkv_bias=True, out_bias=True, n_kv_heads=4),
    "qk norm head": dict(qk_norm="head"),
    "qk norm full, clip": dict(qk_norm="full", clip_qkv=0.5),
    "sliding window": dict(sliding_window=5),
    "tied": dict(tie_embeddings=True),
}


def build(overrides: dict) -> Transformer:
    overrides = dict(overrides)
    moe = dict(d_model=32, d_ff=24, num_experts=4, top_k=2) | overrides.pop("moe", {})
    torch.manual_seed(0)
    fields = dict(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32) | overrides
    cfg = ModelConfig(moe=MoEConfig(**moe), **fields)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # routers far from ties, so both paths choose the same experts
        for block in model.blocks:
            if block.is_moe and hasattr(block.ffn.router, "gate"):
                block.ffn.router.gate.weight.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "plain"])
@pytest.mark.parametrize("case", list(CASES))
def test_decode_step_equals_the_generic_forward(case, prepared, batch=2):
    model = build(CASES[case])
    if prepared:
        prepare_for_inference(model)
    prompt = torch.randint(0, 50, (batch, 7))
    steps = torch.randint(0, 50, (batch, 6))
    with torch.inference_mode():
        ref_cache, cache = KVCache.for_model(model, batch, 16), KVCache.for_model(model, batch, 16)
        model(prompt, kv_cache=ref_cache)
        model(prompt, kv_cache=cache)
        decoder = Decoder(model, cache)
        for i in range(steps.shape[1]):
            ref = model(steps[:, i : i + 1], kv_cache=ref_cache).logits[:, -1]
            got = decoder.step(steps[:, i])
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
        assert cache.length == ref_cache.length == 13
        torch.testing.assert_close(cache.k[:, :, :, :13], ref_cache.k[:, :, :, :13], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.v[:, :, :, :13], ref_cache.v[:, :, :, :13], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "torch ops"])
@pytest.mark.parametrize("case", list(CASES))
def test_one_row_decode_equals_the_generic_forward(case, use_kernels, monkeypatch):
    """Batch 1 runs the projections through moekit.kernels where they are built; both ways
    give the generic forward's logits, and the kernels are used where they apply."""
    if use_kernels and kernels.load() is None:
        pytest.skip(kernels.status())
    calls = {"rows": 0, "MoETokenStep": 0, "AttentionStep": 0}
    real_rows = kernels.rows
    monkeypatch.setattr(kernels, "rows", lambda *a, **k: calls.update(rows=calls["rows"] + 1) or real_rows(*a, **k))
    for name in ("MoETokenStep", "AttentionStep"):
        cls = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, type(name, (cls,), {
            "__call__": lambda self, *a, _n=name, _c=cls: calls.update({_n: calls[_n] + 1}) or _c.__call__(self, *a)}))
    with kernels.enabled(use_kernels):
        test_decode_step_equals_the_generic_forward(case, True, batch=1)
    moe = CASES[case].get("moe", {})
    whole_moe = moe.get("router", "topk") == "topk" and moe.get("expert", "swiglu") == "swiglu" \
        and not moe.get("num_shared_experts")
    assert (calls["MoETokenStep"] > 0) == (use_kernels and whole_moe)
    assert (calls["AttentionStep"] > 0) == (use_kernels and "qk_norm" not in CASES[case])
    assert (calls["rows"] > 0) == use_kernels  # at least the LM head


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_batches_past_the_slot_loop_decode_through_the_sorted_path(batch):
    # 3 and 5 sequences x top-2 exceed the unsorted_max_slots threshold: the MoE layer's sorted path
    test_decode_step_equals_the_generic_forward("mixtral", True, batch)


@pytest.mark.parametrize("case", ["mixtral", "qk norm full, clip", "sliding window"])
def test_padded_batch_decodes_each_sequence_as_alone(case):
    """Left padding: per-sequence positions and a key mask reach the lean step; each row
    generates what it generates alone (greedy)."""
    model = prepare_for_inference(build(CASES[case]))
    prompts = [[3, 9, 4, 1, 7, 7, 2], [5, 11], [8, 1, 30, 2]]
    together = generate_batch(model, prompts, 9, temperature=0).tokens
    alone = [generate_batch(model, [p], 9, temperature=0).tokens[0] for p in prompts]
    assert together == alone


def test_decode_refuses_a_full_cache():
    model = build({})
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, 8)
        model(torch.randint(0, 50, (1, 8)), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache is full: 9 tokens needed, it holds 8"):
            Decoder(model, cache).step(torch.tensor([1]))


def test_bfloat16_decode_stays_near_float32():
    model = build({})
    model_bf16 = build({})
    for p in model_bf16.parameters():  # as load_hf(dtype=bfloat16): the RoPE tables stay float32
        p.data = p.data.bfloat16()
    prompt, nxt = torch.randint(0, 50, (1, 6)), torch.tensor([4])
    out = []
    for m in (model, model_bf16):
        with torch.inference_mode():
            cache = KVCache.for_model(m, 1, 16)
            m(prompt, kv_cache=cache)
            out.append(Decoder(m, cache).step(nxt).float())
            ref = m(prompt, kv_cache=KVCache.for_model(m, 1, 16)).logits  # sanity: generic still runs
            assert ref.dtype == m.embed.weight.dtype
    assert (out[0] - out[1]).abs().max() < 0.1 * out[0].abs().max()


def test_an_moe_under_another_dispatcher_decodes_through_it():
    """Expert parallelism swaps the MoE's dispatcher: the lean step must not bypass it."""
    from moekit.layers.dispatch import dispatch

    model = prepare_for_inference(build({}))
    calls = []
    for block in model.blocks:
        block.ffn.dispatcher = lambda *args, **kw: calls.append(1) or dispatch(*args, **kw)
    prompt = torch.randint(0, 50, (1, 5))
    with torch.inference_mode():
        ref_cache, cache = KVCache.for_model(model, 1, 8), KVCache.for_model(model, 1, 8)
        model(prompt, kv_cache=ref_cache)
        model(prompt, kv_cache=cache)
        calls.clear()
        got = Decoder(model, cache).step(torch.tensor([3]))
        assert len(calls) == 3  # one per MoE layer
        torch.testing.assert_close(got, model(torch.tensor([[3]]), kv_cache=ref_cache).logits[:, -1],
                                   atol=2e-5, rtol=1e-5)


def test_generation_under_bfloat16_autocast():
    model = prepare_for_inference(build({}))
    prompt = [[3, 9, 4, 1, 7]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = generate_batch(model, prompt, 6, temperature=0).tokens
    want = generate_batch(model, prompt, 6, temperature=0).tokens
    assert len(got[0]) == 6 and got[0][:2] == want[0][:2]  # bfloat16 may drift later, not at once
