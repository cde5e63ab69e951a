"""Dynamic expert skipping: 0 changes nothing, a threshold above every second weight makes
top-2 routing top-1, the fast path equals the reference, and generation honours it."""

import dataclasses

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.inference import generate
from moekit.layers.moe import skip_light_experts
from moekit.layers.router import RouterOutput
from moekit.models import Transformer


def model_with(**moe) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                         moe=MoEConfig(**{"d_model": 32, "d_ff": 16, "num_experts": 6, "top_k": 2, **moe}))
    return Transformer(config).eval()


def set_skip(model: Transformer, w: float) -> None:
    for block in model.blocks:
        block.ffn.config = dataclasses.replace(block.ffn.config, skip_below=w)


def test_skipping_nothing_and_skipping_every_second_expert():
    model, top1 = model_with(), model_with(top_k=1)  # same seed: same weights
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        base = model(ids).logits
        set_skip(model, 0.0)
        assert torch.equal(model(ids).logits, base)
        set_skip(model, 0.5)  # the second of two renormalised weights is at most 0.5
        for impl in ("fast", "reference"):
            for block in model.blocks:
                block.ffn.config = dataclasses.replace(block.ffn.config, implementation=impl)
            assert (model(ids).logits - top1(ids).logits).abs().max().item() < 1e-5, impl
    prompt = torch.randint(0, 64, (1, 4))
    assert torch.equal(generate(model, prompt, 12, temperature=0), generate(top1, prompt, 12, temperature=0))


def test_the_rule_on_known_weights():
    w = torch.tensor([[0.7, 0.3], [0.55, 0.45], [0.9, 0.1]])
    out = skip_light_experts(RouterOutput(w, torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.zeros(3, 6),
                                          torch.zeros(3, 6)), 0.35)
    assert out.mask.tolist() == [[True, False], [True, True], [True, False]]
    assert torch.allclose(out.weights, torch.tensor([[1.0, 0.0], [0.55, 0.45], [1.0, 0.0]]))


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match=r"skip_below must be in \[0, 1\)"):
        MoEConfig(d_model=8, d_ff=8, skip_below=1.0)


def test_generate_takes_skip_below(tmp_path, capsys):
    from moekit.data import ByteTokenizer
    from moekit.interop import save_hf
    from tests.reliability.conftest import cli

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                         moe=MoEConfig(d_model=32, d_ff=16, num_experts=6, top_k=2))
    save_hf(Transformer(config).eval(), tmp_path / "hf", tokenizer=ByteTokenizer())
    code, err = cli(capsys, "generate", "--model", str(tmp_path / "hf"), "--prompt", "ab", "--skip-below", "1.5")
    assert code == 1 and "skip_below must be in [0, 1)" in err[-1]
    code, _ = cli(capsys, "generate", "--model", str(tmp_path / "hf"), "--prompt", "ab", "--skip-below", "0.3",
                  "--max-new-tokens", "4")
    assert code == 0
