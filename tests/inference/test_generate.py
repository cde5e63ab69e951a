"""Sampling and the decode loop."""

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.inference import generate, generate_batch, sample_next
from moekit.models import Transformer


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]
    assert sample_next(logits, temperature=1.0, top_k=1).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 3}  # only the two likeliest
    # frequencies follow softmax([3, 2]) = [0.73, 0.27]
    assert abs((draws[:, 0] == 1).float().mean().item() - 0.731) < 0.08
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample_next(logits, -1.0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        sample_next(logits, 1.0, top_k=0)


def model():
    return Transformer(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                                   moe=MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2))).eval()


def test_greedy_generation_with_the_cache_equals_recomputing_everything():
    m = model()
    prompt = torch.randint(0, 40, (2, 5))
    new = generate(m, prompt, 8, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            nxt = m(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(new, seq[:, 5:])


def test_generation_past_the_context_restarts_the_cache():
    m = model()
    prompt = torch.randint(0, 40, (1, 10))
    new = generate(m, prompt, 30, temperature=1.0, seed=0)  # 40 tokens > max_seq_len 16
    assert new.shape == (1, 30) and int(new.max()) < 40
    assert torch.equal(new, generate(m, prompt, 30, temperature=1.0, seed=0))  # seeded: reproducible
    with pytest.raises(ValueError, match="prompt must be"):
        generate(m, torch.zeros(1, 0, dtype=torch.long), 3)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert {int(sample_next(logits, 1.0, top_p=0.4, generator=g)) for _ in range(50)} == {0}
    with pytest.raises(ValueError, match="top_p must be in"):
        sample_next(logits, 1.0, top_p=0.0)


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    m = model()
    prompts = [[3, 1, 4, 1, 5, 9], [2, 6], [5, 3, 5, 8]]
    batch = generate_batch(m, prompts, 7, temperature=0)
    alone = [generate_batch(m, [p], 7, temperature=0).tokens[0] for p in prompts]
    assert batch.tokens == alone
    assert batch.stats.prompt_tokens == 12 and batch.stats.new_tokens == 21 and batch.stats.decode_steps == 6


def test_stop_tokens_end_each_sequence_and_streaming_sees_every_step():
    m = model()
    prompts = [[3, 1, 4], [2, 6, 1]]
    free = generate_batch(m, prompts, 10, temperature=0).tokens
    stop = free[0][2]  # the first sequence's third token
    seen = []
    out = generate_batch(m, prompts, 10, temperature=0, stop_ids=[stop], on_token=lambda ids: seen.append(ids.tolist()))
    for row, full in zip(out.tokens, free):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]
    assert [s[0] for s in seen if s[0] >= 0] == out.tokens[0]
    assert out.stats.decode_tokens_per_s > 0 and out.stats.peak_memory_bytes > 0


def test_max_length_guard():
    m = model()  # max_seq_len 16
    with pytest.raises(ValueError, match="padded batches cannot slide"):
        generate_batch(m, [[1] * 10, [2] * 4], 10)
    long = generate_batch(m, [list(range(30))], 3, temperature=0)  # keeps the last 16 prompt tokens
    assert long.tokens == generate_batch(m, [list(range(14, 30))], 3, temperature=0).tokens
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate_batch(m, [[41]], 2)


def test_prepare_for_inference_keeps_weights_logits_and_state_dict():
    from moekit.inference import prepare_for_inference

    m = Transformer(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                                qkv_bias=True, moe=MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2))).eval()
    tokens = torch.randint(0, 40, (2, 9))
    many = torch.randint(0, 40, (8, 16))  # enough rows per expert for the segment loop
    with torch.no_grad():
        before, before_many = m(tokens).logits, m(many).logits
        state = {k: v.clone() for k, v in m.state_dict().items()}
        params = [id(p) for p in m.parameters()]
        prepare_for_inference(m)
        after = m(tokens).logits
        assert torch.allclose(before_many, m(many).logits, atol=1e-5)
    assert [id(p) for p in m.parameters()] == params  # same Parameter objects (optimizers keep theirs)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    experts, attn = m.blocks[0].ffn.experts, m.blocks[0].attn
    assert experts.w1.data_ptr() == experts.fused_gate_up.data_ptr()  # the fused tensor is really used
    assert attn.wk.weight.data_ptr() == attn.fused_qkv[0][32:].data_ptr()
    assert torch.allclose(before, after, atol=1e-6)
    assert torch.equal(generate(m, tokens[:, :4], 6, temperature=0), generate(m, tokens[:, :4], 6, temperature=0))
    m.train()  # gradients still reach the parameters through the unfused path
    m(tokens, targets=tokens).loss.backward()
    assert m.blocks[0].ffn.experts.w1.grad is not None and m.blocks[0].attn.wq.weight.grad is not None


def test_generation_builds_no_autograd_graph(monkeypatch):
    """The engine runs under inference mode: the prefill and every step see gradients off,
    whatever the caller's mode."""
    m = model()
    seen = []
    real = Transformer.forward

    def spy(self, *a, **k):
        seen.append(torch.is_grad_enabled() or not torch.is_inference_mode_enabled())
        return real(self, *a, **k)

    monkeypatch.setattr(Transformer, "forward", spy)
    with torch.enable_grad():
        generate_batch(m, [[1, 2, 3], [4, 5]], 3)
    assert seen and not any(seen)
