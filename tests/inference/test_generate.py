"""Sampling and the decode loop."""

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.inference import generate, sample_next
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
