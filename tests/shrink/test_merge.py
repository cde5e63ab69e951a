"""Expert merging: identical experts merge exactly, alignment finds a permutation of hidden
units, merging into E is the identity, and bad requests name the problem."""

import pytest
import torch

from moekit.adapt import upcycle
from moekit.config import ModelConfig, MoEConfig
from moekit.models import Transformer
from moekit.shrink import merge_experts
from moekit.shrink.merge import align


def moe_model(num_experts=6, **kw) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **kw,
                         moe=MoEConfig(d_model=32, d_ff=16, num_experts=num_experts, top_k=2))
    return Transformer(config).eval()


def test_identical_experts_merge_exactly():
    torch.manual_seed(0)
    dense = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, dense=True,
                                    dense_d_ff=16)).eval()
    copies = upcycle(dense, num_experts=8, top_k=2)  # 8 identical copies, distinct router rows
    ids = torch.randint(0, 64, (4, 32))
    merged = merge_experts(copies, 3, ids)
    assert merged.config.moe.num_experts == 3
    with torch.no_grad():
        assert (merged(ids).logits - copies(ids).logits).abs().max().item() < 1e-5


def test_merging_into_every_expert_is_the_identity():
    model = moe_model()
    ids = torch.randint(0, 64, (4, 32))
    with torch.no_grad():
        assert torch.equal(merge_experts(model, 6, ids)(ids).logits, model(ids).logits)


def test_alignment_undoes_a_permutation_of_hidden_units():
    model = moe_model(num_experts=2)
    experts = model.blocks[1].ffn.experts
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # expert 1: expert 0 with its hidden units shuffled (the same function)
        experts.w1[1] = experts.w1[0][:, perm]
        experts.w3[1] = experts.w3[0][:, perm]
        experts.w2[1] = experts.w2[0][perm]
    x = torch.randn(256, 32)
    h0 = torch.nn.functional.silu(x @ experts.w1[0]) * (x @ experts.w3[0])
    h1 = torch.nn.functional.silu(x @ experts.w1[1]) * (x @ experts.w3[1])
    p = align(h0, h1)
    assert torch.equal(h1[:, p], h0)
    ids = torch.randint(0, 64, (4, 32))
    merged = merge_experts(model, 1, ids).blocks[1].ffn.experts
    assert torch.allclose(merged.w1[0], experts.w1[0], atol=1e-6)  # aligned, then averaged: expert 0 again
    assert torch.allclose(merged.w2[0], experts.w2[0], atol=1e-6)


def test_bad_merge_requests_name_the_problem():
    ids = torch.randint(0, 64, (2, 16))
    with pytest.raises(ValueError, match=r"into must be in 1..num_experts \(1..6\)"):
        merge_experts(moe_model(), 0, ids)
    with pytest.raises(ValueError, match=r"top_k \(3\) must be in 1..2"):
        merge_experts(moe_model(), 2, ids, top_k=3)
    with pytest.raises(ValueError, match="no MoE layers"):
        merge_experts(Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, dense=True)), 1, ids)
